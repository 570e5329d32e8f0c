"""Routing context: what an MoE linear may know about the tokens it transforms (torch-free).

The encoder passes a `RoutingContext` to every routed linear. Dense linears ignore it. Segment-constant
routers (modality, task, attribute) read `segments`; token and context routers read the hidden states and
`Segment` boundaries only. The attribute rows reproduce the reference table of SPEC §2.3 from named
attributes instead of magic bit vectors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

Modality = Literal["image", "video", "text"]
Side = Literal["input", "target"]

#: Task types whose *input* contains visual tokens.
VISUAL_INPUT_TASKS = frozenset(
    {
        "image_classification",
        "video_classification",
        "image_caption",
        "video_caption",
        "image_retrieval",
        "video_retrieval",
        "vqa",
    }
)
#: Task types whose *input* contains text tokens.
TEXT_INPUT_TASKS = frozenset(
    {"image_caption", "video_caption", "mlm", "text_classification", "vqa"}
)


def attribute_row(
    *,
    input_visual: bool,
    input_text: bool,
    token_visual: bool,
    target_sequence: bool,
    causal: bool,
    target_visual: bool = False,
    target_text: bool = True,
) -> tuple[int, ...]:
    """Build one 8-bit attribute row (SPEC §2.3).

    Bits: b0/b1 the task input holds visual/text tokens, b2/b3 the task target is visual/text,
    b4/b5 this token is visual/text, b6 the token belongs to a target sequence, b7 the token is in a
    causal (auto-regressive) stream.

    Args:
        input_visual: the task's input contains image or video tokens.
        input_text: the task's input contains text tokens.
        token_visual: the token itself is visual (else text; SPE counts with its segment).
        target_sequence: the token belongs to an encoded candidate (target) sequence.
        causal: the token is in the caption's causal streams.
        target_visual: the task's targets are visual (never in the reference).
        target_text: the task's targets are text (always in the reference).

    Returns:
        The row as a tuple of eight 0/1 ints.
    """
    bits = (
        input_visual,
        input_text,
        target_visual,
        target_text,
        token_visual,
        not token_visual,
        target_sequence,
        causal,
    )
    return tuple(int(b) for b in bits)


@dataclass(frozen=True)
class Segment:
    """A run of consecutive tokens that shares one decision under segment-constant routing.

    Attributes:
        length: number of positions in the segment (SPE and deep prompts ride with the first one).
        modality: modality of the segment's tokens.
        attributes: the segment's attribute row (SPEC §2.3).
    """

    length: int
    modality: Modality
    attributes: tuple[int, ...]


@dataclass(frozen=True)
class RoutingContext:
    """Everything a routed linear may condition on, for one encoder call.

    Attributes:
        task: recipe task name (task routing) or target-set name for candidate encodings.
        segments: segments in sequence order; their lengths sum to the sequence length L of the
            tokens being transformed.
        padding: optional (B, L) bool tensor, True at padded positions. Token and context routers
            use it to leave padding out of routing, capacity and the context mean; None means no
            padding. Excluded from equality and repr.
    """

    task: str
    segments: tuple[Segment, ...]
    padding: torch.Tensor | None = field(default=None, compare=False, repr=False)

    @property
    def length(self) -> int:
        """Total positions covered by the segments."""
        return sum(s.length for s in self.segments)

    def with_prefix(self, n: int) -> RoutingContext:
        """Return the context of `n` extra positions prepended to the first segment.

        Used for deep key/value prompts, which ride with the first segment (SPEC §2.5).

        Args:
            n: number of prepended positions (>= 0).

        Returns:
            A context covering `n + self.length` positions.
        """
        if n == 0 or not self.segments:
            return self
        first = self.segments[0]
        grown = Segment(first.length + n, first.modality, first.attributes)
        padding = self.padding
        if padding is not None:
            # prompts are never padding: prepend n visible columns
            widened = padding.new_zeros((padding.shape[0], n + padding.shape[1]))
            widened[:, n:] = padding
            padding = widened
        return RoutingContext(self.task, (grown, *self.segments[1:]), padding)

    def boundaries(self) -> list[tuple[int, int]]:
        """Return the `[start, end)` position range of each segment."""
        out: list[tuple[int, int]] = []
        start = 0
        for seg in self.segments:
            out.append((start, start + seg.length))
            start += seg.length
        return out


def input_segments(
    task_type: str,
    *,
    visual_len: int = 0,
    text_len: int = 0,
    visual_modality: Modality = "image",
) -> tuple[Segment, ...]:
    """Segments of a task's *input* sequence `[SPE, visual..., text...]`.

    The SPE prefix rides with the first segment (visual if there is one). Caption inputs mark their
    text (both streams) as causal, exactly like the reference table.

    Args:
        task_type: recipe task type, e.g. `image_caption`.
        visual_len: number of visual tokens (T * patches), 0 for text-only inputs.
        text_len: number of text positions (both caption streams together), 0 for visual-only inputs.
        visual_modality: `image` or `video`.

    Returns:
        One or two segments covering `1 + visual_len + text_len` positions.
    """
    input_visual = task_type in VISUAL_INPUT_TASKS
    input_text = task_type in TEXT_INPUT_TASKS

    def row(token_visual: bool, causal: bool) -> tuple[int, ...]:
        return attribute_row(
            input_visual=input_visual,
            input_text=input_text,
            token_visual=token_visual,
            target_sequence=False,
            causal=causal,
        )

    segs: list[Segment] = []
    spe = 1
    if visual_len > 0:
        segs.append(
            Segment(spe + visual_len, visual_modality, row(token_visual=True, causal=False))
        )
        spe = 0
    if text_len > 0 or not segs:
        caption = task_type in ("image_caption", "video_caption")
        segs.append(Segment(spe + text_len, "text", row(token_visual=False, causal=caption)))
    return tuple(segs)


def target_segments(
    target_kind: Literal["classes", "captions", "vocabulary", "labels"], length: int
) -> tuple[Segment, ...]:
    """Segment of an encoded candidate sequence `[SPE, tokens..., EOT]`.

    Class-name sets and retrieval captions use the retrieval-target row; the vocabulary and GLUE label
    words use the caption-style row with both input bits set (SPEC §2.3).

    Args:
        target_kind: which kind of target set the sequence belongs to.
        length: positions including the SPE prefix.

    Returns:
        One segment covering `length` positions.
    """
    both = target_kind in ("vocabulary", "labels")
    row = attribute_row(
        input_visual=True,
        input_text=both,
        token_visual=False,
        target_sequence=True,
        causal=False,
    )
    return (Segment(length, "text", row),)
