"""Lookup tables built once per architecture from the declarative rows: native <-> canonical.

Canonical names are diffusers names prefixed by the component ("unet.conv_in.weight",
"text_encoder_2.text_projection.weight"). `LdmTable.resolve` turns a single-file key into its link,
None for a known extra (scheduler buffer, EMA copy...), and raises for anything else: a key that
does not map is an error that names it, never a silent skip.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from npo_merge.errors import KeyMappingError
from npo_merge.io.keymap.architectures import ARCHITECTURES, DIFFUSERS_EXTRAS, Architecture
from npo_merge.io.keymap.links import KeyLink


@dataclass(frozen=True)
class LdmTable:
    """Every tensor link of one architecture's single-file (LDM/SGM) layout, with full names."""

    architecture: Architecture
    by_native: dict[str, KeyLink]
    by_canonical: dict[str, KeyLink]
    extras: re.Pattern[str]

    def resolve(self, native: str) -> KeyLink | None:
        link = self.by_native.get(native)
        if link is not None:
            return link
        if self.extras.fullmatch(native):
            return None
        raise KeyMappingError(
            f"tensor {native!r} is not part of the {self.architecture.label} single-file layout;"
            " the file may be another architecture or carry extra modules"
        )

    def link_for_canonical(self, canonical: str) -> KeyLink:
        try:
            return self.by_canonical[canonical]
        except KeyError:
            raise KeyMappingError(
                f"{canonical!r} has no {self.architecture.label} single-file name"
            ) from None


@lru_cache(maxsize=None)
def ldm_table(architecture: str) -> LdmTable:
    """The single-file naming table of an architecture ("sd1", "sd2", "sdxl")."""
    arch = ARCHITECTURES[architecture]
    by_native: dict[str, KeyLink] = {}
    by_canonical: dict[str, KeyLink] = {}
    for component in arch.components:
        for link in component.links():
            full = KeyLink(
                component.ldm_prefix + link.native,
                tuple(f"{component.name}.{key}" for key in link.canonical),
                link.transform,
            )
            if full.native in by_native:
                raise AssertionError(f"duplicate native key in table: {full.native}")
            by_native[full.native] = full
            for key in full.canonical:
                if key in by_canonical:
                    raise AssertionError(f"duplicate canonical key in table: {key}")
                by_canonical[key] = full
    extras = re.compile("|".join(f"(?:{pattern})" for pattern in arch.ldm_extras))
    return LdmTable(arch, by_native, by_canonical, extras)


def canonical_keys(architecture: str) -> frozenset[str]:
    """Every canonical tensor name of an architecture (diffusers names with component prefix)."""
    return frozenset(ldm_table(architecture).by_canonical)


_DIFFUSERS_EXTRAS = re.compile("|".join(f"(?:{p})" for p in DIFFUSERS_EXTRAS))


def is_diffusers_extra(canonical: str) -> bool:
    """True for names diffusers folders may hold that carry no model weight (old position_ids)."""
    return bool(_DIFFUSERS_EXTRAS.fullmatch(canonical))


def canonical_modules(architecture: str) -> frozenset[str]:
    """Canonical module names (tensor names without the trailing .weight/.bias)."""
    return frozenset(key.rsplit(".", 1)[0] for key in canonical_keys(architecture))
