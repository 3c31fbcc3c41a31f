"""Length groups for the within-visit LSTM (no torch: the estimator sizes them too).

A batch's real visits have different numbers of codes. Running them through one LSTM call pads
every visit to the longest one, and the padded steps cost as much as the real ones: on the
synthetic CKD cohort a 4-patient batch holds about 155 real codes per patient but pads them to
about 274 code slots. Sorting the visits by length and cutting them into a few groups, each padded
only to its own longest visit, removes most of that padding; each extra group costs one more set
of kernel calls, so a cut is made only where it saves more padded slots than a call costs.

`plan_groups` solves that exactly: over the distinct lengths of the visits sorted longest first,
a dynamic program picks the cuts that minimise ``sum(n_g * L_g) + call_slots * groups`` (``n_g``
visits padded to ``L_g`` codes in group ``g``). ``call_slots`` is the cost of one extra call in
code slots; `GROUP_CALL_SLOTS` was chosen with ``benchmarks/train_throughput.py`` on one CPU core
(64 to 256 gave the same speed; 16 was slower).

The model uses it on the CPU only (`grouping_enabled`): CUDA and MPS keep one call, whose cost is
dominated by launches rather than padded steps, and whose memory the estimator already models.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

GROUP_CALL_SLOTS = 128


def grouping_enabled(device_type: str) -> bool:
    """Whether the within-visit encoder runs length groups on this device type."""
    return device_type == "cpu"


def plan_groups(
    lengths_desc: Sequence[int], call_slots: int = GROUP_CALL_SLOTS
) -> list[tuple[int, int, int]]:
    """Cut visits sorted by length, longest first, into groups: ``(start, end, length)`` each,
    ``length`` being the group's longest visit (its first). Every visit lands in one group."""
    n = len(lengths_desc)
    if n == 0:
        return []
    starts = [0] + [i for i in range(1, n) if lengths_desc[i] != lengths_desc[i - 1]]
    bounds = [*starts, n]
    d = len(starts)
    # best[j]: the least cost of the visits from starts[j] on; nxt[j]: where its first group ends
    best = [0] * (d + 1)
    nxt = [d] * (d + 1)
    for j in range(d - 1, -1, -1):
        length, s = lengths_desc[starts[j]], starts[j]
        # the first group ends at bounds[k]; ties go to the earliest cut
        best[j], nxt[j] = min(
            ((bounds[k] - s) * length + call_slots + best[k], k) for k in range(j + 1, d + 1)
        )
    out, j = [], 0
    while j < d:
        k = nxt[j]
        out.append((starts[j], bounds[k], lengths_desc[starts[j]]))
        j = k
    return out


def group_shapes(
    lengths: Iterable[int], call_slots: int = GROUP_CALL_SLOTS
) -> list[tuple[int, int]]:
    """``(visits, codes)`` of each group the encoder runs for visits of these code counts
    (empty visits, length 0, are skipped as the model skips them)."""
    desc = sorted((int(x) for x in lengths if x > 0), reverse=True)
    return [(e - s, length) for s, e, length in plan_groups(desc, call_slots)]
