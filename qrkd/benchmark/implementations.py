"""The implementations ("impls") a case is measured with, and the call each of them makes."""

from __future__ import annotations

from .cases import COMPILED, OPS, Case


def _compiled_wanted(case: Case, policy: str, quick: bool) -> bool:
    """torch.compile costs 5-30 s per case on a small CPU: by default it runs at the named shapes and along one
    series of the angle loss (the relation where compiling the reference could matter most), not everywhere."""
    if case.relation == "photonic" or policy == "none":
        return False
    if policy == "all":
        return True
    if quick:  # one compiled case: the seed's shape on a CPU, the GPU target of the kernels issue on a GPU
        wanted = "seed" if case.device == "cpu" else "issue3"
        return case.relation == "angle" and wanted in case.tags and case.n <= 2048
    if case.tags:
        return case.n <= (1024 if case.device == "cpu" else 2048) or case.relation != "angle"
    grid_d = 512 if case.device == "cuda" else 128
    return case.relation == "angle" and case.ds == case.dt == grid_d and case.n <= 1024


def _merlin_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("merlin") is not None


def implementations(case: Case, *, compiled="auto", quick=False, merlin_max_n=128, include=None, exclude=()) -> list:
    """The impls measured for a case: the references first, then every qrkd backend that runs the relation there."""
    import torch

    import qrkd
    from qrkd import backends

    dtype = getattr(torch, case.dtype)
    op = OPS[case.relation]
    names = []
    if case.relation == "photonic":
        if _merlin_available() and case.n <= merlin_max_n:
            names.append("merlin")
        op_dtype = torch.complex128 if dtype == torch.float64 else torch.complex64
        qrkd_names = list(backends.available_backends()) if hasattr(qrkd, "PhotonicFidelityKernel") else []
    else:
        names.append("reference")
        if _compiled_wanted(case, compiled, quick):
            names.append(COMPILED)
        if case.relation == "distance":
            names.append("reference-zd")
        op_dtype = dtype
        qrkd_names = [b for b in backends.available_backends() if b != "reference"]
    for name in qrkd_names:
        if name == "triton" and case.device == "cpu":
            continue  # Triton's interpreter is a correctness tool, not a performance path
        if backends.supports(name, op, case.device, op_dtype):
            names.append(name)
    if include:
        names = [n for n in names if n in include]
    return [n for n in names if n not in exclude]


def reference_impl(relation: str, measured: dict) -> str | None:
    """The impl a case's ratios are taken against: the reference backend, MerLin for the photonic kernel."""
    order = ("merlin", "reference") if relation == "photonic" else ("reference",)
    for name in order:
        if name in measured:
            return name
    return None


def _impl_order(names) -> list:
    order = ("merlin", "reference", COMPILED, "reference-zd", "torch", "cpp", "triton")
    rank = {name: i for i, name in enumerate(order)}
    return sorted(names, key=lambda n: (rank.get(n, len(rank)), n))


def build_call(case: Case, impl: str):
    """(call, sync): call() runs one forward (under no_grad) or forward+backward of `impl` on the case's inputs and
    returns the loss; sync() waits for the device. Used by the sweep's children and by the pytest-benchmark suites."""
    import torch

    dtype = getattr(torch, case.dtype)
    device = torch.device(case.device)
    gen = torch.Generator().manual_seed(1000 + case.n)
    student = torch.randn(case.n, case.ds, generator=gen, dtype=dtype).to(device)
    teacher = torch.randn(case.n, case.dt, generator=gen, dtype=dtype).to(device)
    loss = _loss_function(case, impl, device, dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    if case.mode == "fwd":

        def call():
            with torch.no_grad():
                return loss(student, teacher)

    else:
        student.requires_grad_(True)

        def call():
            student.grad = None
            out = loss(student, teacher)
            out.backward()
            return out.detach()

    return call, sync


def _loss_function(case: Case, impl: str, device, dtype):
    import torch
    import torch.nn.functional as F

    import qrkd
    from qrkd.backends import reference
    from qrkd.functional import common_columns

    if impl == "merlin":
        if case.relation != "photonic":
            raise ValueError(f"impl 'merlin' measures the photonic relation only, not {case.relation!r}")
        import merlin

        mk = merlin.FidelityKernel.simple(
            input_size=case.ds, n_modes=case.modes, dtype=dtype, device=device, force_psd=False
        )
        if sum(int(s) for s in mk.input_state) != case.photons:
            raise ValueError(f"MerLin's simple kernel has {sum(mk.input_state)} photons, the case wants {case.photons}")
        mk.requires_grad_(False)  # its interferometers are Parameters the seed never trains

        def merlin_loss(s, t):
            with torch.no_grad():
                k_t = mk(t)
            return F.smooth_l1_loss(mk(s), k_t)

        return merlin_loss
    if impl == COMPILED:
        if case.relation == "photonic":
            raise ValueError("the photonic relation has no compiled reference")
        import torch._inductor.config as inductor_config

        inductor_config.compile_threads = 1  # no pool of compile workers for a handful of kernels
        compiled = torch.compile(getattr(reference, OPS[case.relation]), dynamic=False)
        if case.relation == "distance":
            return lambda s, t: compiled(s, t, False)
        if case.relation == "fidelity":  # the public loss's own first step, outside the compiled function
            return lambda s, t: compiled(*(x.contiguous() for x in common_columns(s, t)))
        return compiled
    if impl == "reference-zd":
        return lambda s, t: qrkd.rkd_distance_loss(s, t, zero_diagonal=True, backend="reference")
    backend = impl
    if case.relation == "angle":
        return lambda s, t: qrkd.rkd_angle_loss(s, t, backend=backend)
    if case.relation == "distance":
        return lambda s, t: qrkd.rkd_distance_loss(s, t, zero_diagonal=False, backend=backend)
    if case.relation == "fidelity":
        return lambda s, t: qrkd.fidelity_kernel_loss(s, t, backend=backend)
    kernel = qrkd.PhotonicFidelityKernel(case.ds, case.modes, n_photons=case.photons, seed=0, dtype=dtype).to(device)
    return lambda s, t: qrkd.fidelity_kernel_loss(s, t, kernel=kernel, backend=backend)
