"""TPU slices by name, for the compile-only sizing (`ualm bench compile`, `train --dry-run
--topology`) and the launchers' preflight: one table of generations, one default chip grid per
slice size, one count of hosts. No jax: the launchers import it before any cloud command.

Names: Cloud TPU accelerator types (`v5p-128`, `v4-32` count TensorCores, 2 per chip;
`v5litepod-16` / `v5e-8`, `v6e-16` count chips), explicit chip grids (`v5p:4x4x4`, `v5e:2x4`), or
`cpu:N` (N host CPU devices).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from ualm_jax.config import ConfigError

GiB = 1024 ** 3

# generation -> (chip grid dims, TensorCores per chip counted by the Cloud TPU name, HBM per chip,
#                libtpu chip config). v4/v5p are megacore: one JAX device per chip.
GENERATIONS = {
    "v4": dict(ndim=3, cores_in_name=2, hbm=32 * GiB, chip_config="megacore"),
    "v5p": dict(ndim=3, cores_in_name=2, hbm=95 * GiB, chip_config="megacore"),
    "v5e": dict(ndim=2, cores_in_name=1, hbm=16 * GiB, chip_config="default"),
    "v6e": dict(ndim=2, cores_in_name=1, hbm=32 * GiB, chip_config="default"),
}
ALIASES = {"v5": "v5p", "v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e"}


@dataclass
class Topology:
    name: str                       # as given
    platform: str                   # "tpu" | "cpu"
    chips: int
    generation: str | None = None   # v4 | v5p | v5e | v6e
    grid: tuple[int, ...] = ()      # chip grid, e.g. (4, 4, 4)
    hbm_bytes: int | None = None
    libtpu_kwargs: dict = field(default_factory=dict)

    @property
    def libtpu_name(self) -> str:
        return f"{self.generation}:{'x'.join(map(str, self.grid))}"

    @property
    def cores_in_name(self) -> int:
        """TensorCores per chip that the Cloud TPU name counts (v4/v5p: 2)."""
        return GENERATIONS[self.generation]["cores_in_name"] if self.generation else 1

    @property
    def chips_per_host(self) -> int:
        """TPU VMs hold 4 chips; a 2D (v5e/v6e) slice of up to 8 chips is one host."""
        if self.platform != "tpu" or (len(self.grid) == 2 and self.chips <= 8):
            return self.chips
        return min(4, self.chips)

    @property
    def hosts(self) -> int:
        """JAX processes of the slice (one per host)."""
        return max(1, self.chips // self.chips_per_host)


def _default_grid(chips: int, ndim: int) -> tuple[int, ...]:
    """Cloud TPU's default slice shapes: 2D 1x1, 2x2, 2x4, 4x4, 4x8, 8x8, 8x16, 16x16; 3D 2x2x1,
    2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, ... (double the last of the smallest dimensions)."""
    dims = [1] * ndim
    if ndim == 3:
        dims = [2, 2, 1]
        if chips < 4:
            raise ConfigError(f"a 3D TPU slice has at least 4 chips, got {chips}")
    while math.prod(dims) < chips:
        low = min(dims)
        i = max(j for j, d in enumerate(dims) if d == low)
        dims[i] *= 2
    if math.prod(dims) != chips:
        raise ConfigError(f"{chips} chips is not a power of two: give the chip grid explicitly, "
                          f"e.g. v5p:4x4x12")
    return tuple(dims)


def parse_topology(text: str) -> Topology:
    """`cpu:N`, `v5p-128` (Cloud TPU accelerator name) or `v5p:4x4x4` (chip grid)."""
    t = text.strip().lower()
    known = ", ".join(sorted(GENERATIONS))
    m = re.fullmatch(r"cpu:(\d+)", t)
    if m:
        n = int(m.group(1))
        if n < 1:
            raise ConfigError(f"--topology {text!r}: cpu:N needs N >= 1")
        return Topology(text, "cpu", n)
    m = re.fullmatch(r"([a-z0-9]+)(?:-(\d+)|:(\d+(?:x\d+)*))", t)
    gen = ALIASES.get(m.group(1), m.group(1)) if m else None
    if gen not in GENERATIONS:
        raise ConfigError(f"--topology {text!r} is unknown: use cpu:N, a Cloud TPU name such as "
                          f"v5p-128 / v5e-8, or a chip grid such as v5p:4x4x4 "
                          f"(generations: {known})")
    spec = GENERATIONS[gen]
    if m.group(2):
        cores = int(m.group(2))
        if cores % spec["cores_in_name"] or cores == 0:
            raise ConfigError(f"--topology {text!r}: {gen}-N counts TensorCores "
                              f"({spec['cores_in_name']} per chip), so N must be a positive "
                              f"multiple of {spec['cores_in_name']}")
        grid = _default_grid(cores // spec["cores_in_name"], spec["ndim"])
    else:
        grid = tuple(int(x) for x in m.group(3).split("x"))
        if len(grid) != spec["ndim"] or min(grid) < 1:
            raise ConfigError(f"--topology {text!r}: {gen} chip grids have {spec['ndim']} positive "
                              f"dimensions, e.g. {'v5p:4x4x4' if spec['ndim'] == 3 else 'v5e:2x4'}")
    # Full 3D tori (every side >= 4) wrap around; smaller slices and 2D grids are open meshes
    # except 16-long 2D sides. Affects collective routing, not memory.
    wrap = (tuple(min(grid) >= 4 for _ in grid) if spec["ndim"] == 3
            else tuple(d >= 16 for d in grid) + (False,))
    host = (min(grid[0], 2), min(grid[1], 2), 1)  # 4-chip hosts; a 1- or 2-chip slice has one
    kwargs = dict(chip_config_name=spec["chip_config"], chips_per_host_bounds=host,
                  num_slices=1, wrap=wrap)
    return Topology(text, "tpu", math.prod(grid), gen, grid, spec["hbm"], kwargs)
