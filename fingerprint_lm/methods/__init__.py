"""Fingerprinting methods behind one interface (docs/design.md, "Methods").

A method says how a user's code becomes the tensors of a copy, which extractor reads it, how the
training stage runs, and what a checkpoint records. ``conf/method/<name>.yaml`` selects one with
``_target_``:

* :class:`PNMMethod` (``method=pnm``): the code lives only in stock ``AutoencoderKL`` weights (the
  affine weight/bias of the decoder's GroupNorms); read by a shift-invariant extractor. A copy is a
  plain diffusers folder.
* :class:`CarrierMethod` (``method=carrier``): PNM coefficients plus a tile-periodic carrier bias map
  at ``conv_norm_out``, read by a tile-folding linear reader; the bias map ships as an extra file.
* ``method=wouaf`` (a :class:`PNMMethod` config): WOUAF's weight modulation, the code in the input
  channel scales of every decoder conv. Baseline.
* :class:`StableSignatureMethod` (``method=stable_signature``): one decoder fine-tuned per user
  against the fixed extractor; a copy costs a training run. Baseline.
"""

from fingerprint_lm.methods.base import FingerprintMethod, personal_tensors
from fingerprint_lm.methods.carrier import CarrierMethod
from fingerprint_lm.methods.pnm import PNMMethod
from fingerprint_lm.methods.stable_signature import StableSignatureMethod

__all__ = ["CarrierMethod", "FingerprintMethod", "PNMMethod", "StableSignatureMethod", "personal_tensors"]
