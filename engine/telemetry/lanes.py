"""The lanes of a decode-step timeline: what each one shows, and which ones carry PCIe traffic.

A lane is one kind of work on one CUDA stream. The offload runtime reports every per-layer operation
under one of these names; the recorder, the metrics, the trace export and the timeline plot all key on
them, so a lane added here appears everywhere at once.
"""

from __future__ import annotations

LANES: tuple[str, ...] = ("h2d_act", "h2d_kv", "recompute", "attention", "compute", "d2h_writeback")

LANE_LABELS: dict[str, str] = {
    "h2d_act": "H2D activations",
    "h2d_kv": "H2D KV",
    "recompute": "recompute K/V",
    "attention": "attention",
    "compute": "MLP / other compute",
    "d2h_writeback": "D2H write-back",
}

# PCIe lanes and their direction. Payload GB/s is computed per direction, because H2D and D2H use
# separate halves of the link and run concurrently (77.6 GB/s both ways vs ~55 GB/s one way on H100).
PCIE_DIRECTION: dict[str, str] = {"h2d_act": "h2d", "h2d_kv": "h2d", "d2h_writeback": "d2h"}
PCIE_LANES: tuple[str, ...] = tuple(lane for lane in LANES if lane in PCIE_DIRECTION)
DIRECTIONS: tuple[str, ...] = ("h2d", "d2h")

LANE_INDEX: dict[str, int] = {lane: i for i, lane in enumerate(LANES)}


def check_lane(lane: str) -> int:
    """The lane's index in LANES; a ValueError naming the valid lanes for anything else."""
    index = LANE_INDEX.get(lane) if isinstance(lane, str) else None
    if index is None:
        raise ValueError(f"unknown lane {lane!r}: the lanes are {', '.join(LANES)}")
    return index


def lanes_in_direction(direction: str) -> tuple[str, ...]:
    """The PCIe lanes that move data in `direction` ("h2d" or "d2h")."""
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown PCIe direction {direction!r}: the directions are {', '.join(DIRECTIONS)}")
    return tuple(lane for lane in PCIE_LANES if PCIE_DIRECTION[lane] == direction)


def lane_label(lane: str) -> str:
    """The human label of a lane (e.g. "H2D KV" for "h2d_kv")."""
    check_lane(lane)
    return LANE_LABELS[lane]
