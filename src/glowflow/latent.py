"""The editing API under its earlier name: every name here lives in one of three modules by job.

- :mod:`glowflow.editing`: safe decoding, interpolation, reconstruction, sampling, manipulation.
- :mod:`glowflow.directions`: the :class:`Directions` class, their estimation and their file.
- :mod:`glowflow.data.attributes`: the CelebA and CSV attribute-file parsers.

``from glowflow.latent import X`` keeps working for every public name of the three.
"""
from __future__ import annotations

from .data.attributes import (AttributeTable, parse_attribute_csv, parse_attribute_file, parse_celeba_attributes,
                              table_image_paths)
from .directions import (DIRECTIONS_JSON, DIRECTIONS_WEIGHTS, MAX_KEPT_LATENT_VALUES, DirectionAccumulator,
                         Directions, attribute_directions, class_attributes, directions_dir, directions_from_images,
                         load_directions, pair_attributes, resolve_class, save_directions)
from .editing import (ALPHA_STEPS, DECODE_BATCH, EDIT_DETAIL, FAILED_EDITS, INTERPOLATIONS, MIN_VALID,
                      STABLE_SCALE_FLOOR, DecodeError, decode_latents, edit, edited_latents, failed_decodes,
                      interpolate, lerp, manipulate, reconstruct, sample, slerp, specks, valid_alpha_range)

__all__ = ["interpolate", "reconstruct", "sample", "manipulate", "edit", "DecodeError", "FAILED_EDITS",
           "STABLE_SCALE_FLOOR", "DECODE_BATCH", "failed_decodes", "specks", "EDIT_DETAIL", "edited_latents",
           "decode_latents", "valid_alpha_range", "ALPHA_STEPS", "MIN_VALID", "lerp", "slerp", "Directions",
           "DirectionAccumulator", "attribute_directions", "directions_from_images", "class_attributes",
           "pair_attributes", "resolve_class", "AttributeTable", "parse_attribute_file", "parse_attribute_csv",
           "parse_celeba_attributes", "table_image_paths", "directions_dir", "save_directions", "load_directions",
           "INTERPOLATIONS", "DIRECTIONS_WEIGHTS", "DIRECTIONS_JSON", "MAX_KEPT_LATENT_VALUES"]
