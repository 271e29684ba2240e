"""The cases of a sweep: relations, modes, the named shapes, the grids of sizes, and Case itself."""

from __future__ import annotations

import dataclasses

from ..relations import BENCHMARKED, BY_NAME

RELATIONS = BENCHMARKED  # qrkd/relations.py
MODES = ("fwd", "fwdbwd")
MODE_TITLES = {"fwd": "forward", "fwdbwd": "forward+backward"}
OPS = {r: BY_NAME[r].op for r in RELATIONS}  # the backend contract function each relation measures
TIME_EXPONENT = {r: BY_NAME[r].time_exponent for r in RELATIONS}  # work growth in N (failure prediction)
REFERENCE_IMPLS = ("reference", "reference-compiled", "reference-zd", "merlin")
COMPILED = "reference-compiled"
PHOTONIC_CIRCUIT = (4, 10, 5)  # the seed's kernel: d = 4 features (min(Ds, Dt)), m = 10 modes, n = 5 photons
FAILED = ("oom", "timeout", "error")

# the named shapes: the seed's, and the ones the kernels issues state their targets at (always part of a sweep)
_SEED = [("angle", 128, 4, 31), ("distance", 128, 4, 31), ("fidelity", 128, 4, 31), ("photonic", 128, 4, 4)]
NAMED = {
    "cpu": [(*s, "seed") for s in _SEED]
    + [
        ("angle", 512, 128, 512, "issue3"),
        ("angle", 4096, 512, 512, "issue3"),
        ("distance", 128, 512, 512, "issue3"),
        ("distance", 2048, 512, 512, "issue3"),
        ("fidelity", 128, 512, 512, "issue3"),
        ("fidelity", 2048, 512, 512, "issue3"),
        ("photonic", 4096, 4, 4, "issue4"),
    ],
    "cuda": [(*s, "seed") for s in _SEED]
    + [
        ("angle", 1024, 512, 512, "issue3"),
        ("angle", 8192, 512, 512, "issue3"),
        ("distance", 8192, 512, 512, "gpu-max"),
        ("fidelity", 8192, 512, 512, "gpu-max"),
        ("photonic", 8192, 4, 4, "issue4"),
    ],
}
# (device, quick) -> {relation: (N list, D list)}; the photonic relation uses the seed's circuit for every N
GRIDS = {
    ("cpu", False): {
        "angle": ([64, 128, 256, 512, 1024, 2048], [4, 128, 512]),
        "distance": ([64, 128, 256, 512, 1024, 2048, 4096], [4, 128, 512]),
        "fidelity": ([64, 128, 256, 512, 1024, 2048, 4096], [4, 128, 512]),
        "photonic": ([64, 128, 256, 512, 1024, 2048, 4096], [4]),
    },
    ("cpu", True): {
        "angle": ([64, 256], [128]),
        "distance": ([64, 256], [128]),
        "fidelity": ([64, 256], [128]),
        "photonic": ([16, 64], [4]),
    },
    ("cuda", False): {
        "angle": ([64, 128, 256, 512, 1024, 2048, 4096, 8192], [4, 128, 512]),
        "distance": ([64, 128, 256, 512, 1024, 2048, 4096, 8192], [4, 128, 512]),
        "fidelity": ([64, 128, 256, 512, 1024, 2048, 4096, 8192], [4, 128, 512]),
        "photonic": ([64, 128, 256, 512, 1024, 2048, 4096, 8192], [4]),
    },
    ("cuda", True): {  # the named shapes only: the GPU check has minutes for build, tests and sweep together
        "angle": ([], [512]),
        "distance": ([], [512]),
        "fidelity": ([], [512]),
        "photonic": ([], [4]),
    },
}


@dataclasses.dataclass(frozen=True)
class Case:
    """One measured configuration; every impl of a case sees the same inputs (seeded by N)."""

    relation: str
    mode: str
    n: int
    ds: int
    dt: int
    dtype: str = "float32"
    device: str = "cpu"
    modes: int = 0  # photonic: m
    photons: int = 0  # photonic: n
    tags: tuple = dataclasses.field(default=(), compare=False)

    @property
    def shape(self) -> str:
        if self.relation == "photonic":
            return f"N{self.n}-d{self.ds}-m{self.modes}-n{self.photons}"
        return f"N{self.n}-Ds{self.ds}-Dt{self.dt}"

    @property
    def id(self) -> str:
        return f"{self.relation}-{self.mode}-{self.dtype}-{self.device}-{self.shape}"

    @property
    def series(self) -> tuple:
        """What stays fixed while N grows."""
        return (self.relation, self.ds, self.dt, self.dtype, self.device, self.modes, self.photons)

    def describe(self) -> str:
        if self.relation == "photonic":
            return f"N={self.n} d={self.ds} m={self.modes} n={self.photons}"
        return f"N={self.n} Ds={self.ds} Dt={self.dt}"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["tags"] = list(self.tags)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Case":
        d = dict(d)
        d["tags"] = tuple(d.get("tags", ()))
        return cls(**d)


def make_case(relation, mode, n, ds, dt, dtype="float32", device="cpu", tags=()) -> Case:
    if relation not in RELATIONS:
        raise ValueError(f"relation must be one of {RELATIONS}, got {relation!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if relation == "photonic":
        d, m, p = PHOTONIC_CIRCUIT
        return Case(relation, mode, n, d, d, dtype, device, m, p, tuple(tags))
    return Case(relation, mode, n, ds, dt, dtype, device, 0, 0, tuple(tags))


def plan(device="cpu", quick=False, relations=RELATIONS, modes=MODES, dtypes=("float32",), ns=None, ds=None,
         named=True) -> list:
    """The cases of a sweep, smallest N first (so that failures at one size predict the next), each once; a case that
    is both on the grid and a named shape carries the name as a tag."""
    grid = GRIDS[(device, quick)]
    if device == "cuda" and quick and modes == MODES:
        modes = ("fwdbwd",)  # the GPU check has minutes for build, tests and sweep together
    found: dict = {}

    def add(relation, n, d_s, d_t, tags=()):
        for dtype in dtypes:
            for mode in modes:
                case = make_case(relation, mode, n, d_s, d_t, dtype, device, tags)
                if case in found:
                    merged = tuple(sorted(set(found[case].tags) | set(tags)))
                    found[case] = dataclasses.replace(found[case], tags=merged)
                else:
                    found[case] = case

    for relation in relations:
        n_list, d_list = grid[relation]
        n_list = ns if ns else n_list
        d_list = [PHOTONIC_CIRCUIT[0]] if relation == "photonic" else (ds if ds else d_list)
        for n in n_list:
            for d in d_list:
                add(relation, n, d, d)
    if named:
        for relation, n, d_s, d_t, tag in NAMED[device]:
            if relation in relations and (not quick or tag == "seed" or device == "cuda"):
                add(relation, n, d_s, d_t, (tag,))
    order = {r: i for i, r in enumerate(RELATIONS)}
    return sorted(found.values(), key=lambda c: (c.n, order[c.relation], c.ds, c.dt, c.dtype, MODES.index(c.mode)))
