"""fastrpb.parallel with torch.distributed (gloo on 127.0.0.1), P processes.

Run as a script by ``test_parallel.py``: ``python parallel_torch.py P [P ...]``. For each
``P`` it spawns ``P`` processes (``torch.multiprocessing.spawn``, a free port); each
holds one block of the sequence, computes ``fastrpb.parallel.linear_attention`` /
``rpb``, and calls ``backward`` on its part of a scalar loss. Rank 0 collects every
block and asserts that the forward pass equals the float64 dense oracle
(``oracles.py``) and the single-process call, and that the gradients equal the
single-process ones (the bias table's gradient summed over ranks). Prints one line
per case and ``OK``.
"""

from __future__ import annotations

import os
import socket
import sys

sys.path[:0] = [
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"),
    os.path.dirname(os.path.abspath(__file__)),
]

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

B, H, L, D = 2, 2, 24, 4
RTOL = 1e-9
# (map, causal, bias, skip, key mask)
CASES = [
    ("elu", True, True, (2, 1), False),
    ("sikf", False, True, (0, 0), True),
    ("sikf", True, False, (0, 0), False),
    ("favor", True, False, (0, 0), True),
    ("dpfp", False, True, (0, 3), False),
]


def data(seed: int = 20260311) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "q": rng.standard_normal((B, H, L, D)) * 3,
        "k": rng.standard_normal((B, H, L, D)) * 3 + 0.5 * np.arange(L)[:, None],
        "v": rng.standard_normal((B, H, L, D)),
        "w": rng.standard_normal((H, 2 * L - 1)) * 0.1,
        "mask": rng.random((B, H, L)) > 0.2,
        "proj": rng.standard_normal((6, D)),
        "weight": rng.standard_normal((B, H, L, D)),
    }


def oracle(d, fmap, causal, with_bias, skip, masked):
    import oracles

    q, k, v = d["q"], d["k"], d["v"]
    km = d["mask"] if masked else None
    if fmap in ("elu", "dpfp"):
        phi = oracles.elu1 if fmap == "elu" else oracles.dpfp
        out = oracles.kernel_attention(phi(q), phi(k), v, causal=causal, key_mask=km, eps=1e-6)
    else:
        lq, lk = (q, k) if fmap == "sikf" else (oracles.favor_log(q, d["proj"]), oracles.favor_log(k, d["proj"]))
        out = oracles.exp_kernel_attention(lq, lk, v, causal=causal, key_mask=km, eps=1e-6)
    if with_bias:
        vm = v if km is None else np.where(km[..., None], v, 0.0)
        out = out + oracles.toeplitz(d["w"], L, causal=causal, skip=skip) @ vm
    return out


def attend(fastrpb_fn, d, fmap, causal, with_bias, skip, masked, lo, hi, **comm):
    """Output and gradients of ``sum(out * weight)`` on tokens ``lo:hi`` (torch, float64)."""
    import fastrpb

    t = {n: torch.tensor(d[n][..., lo:hi, :]) for n in ("q", "k", "v", "weight")}
    for n in ("q", "k", "v"):
        t[n].requires_grad_(True)
    w = torch.tensor(d["w"], requires_grad=True)
    maps = {"favor": fastrpb.feature_maps.favor(torch.tensor(d["proj"]))}
    out = fastrpb_fn(
        t["q"], t["k"], t["v"],
        feature_map=maps.get(fmap, fmap), causal=causal, chunk_size=5,
        key_mask=torch.tensor(d["mask"][..., lo:hi]) if masked else None,
        rpb=w if with_bias else None, rpb_skip=skip, **comm,
    )  # fmt: skip
    torch.sum(out * t["weight"]).backward()
    grads = [t[n].grad for n in ("q", "k", "v")] + ([w.grad] if with_bias else [])
    return out.detach(), [g.detach() for g in grads]


def worker(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        import fastrpb
        from fastrpb import parallel

        d = data()
        Lb = L // world
        lo, hi = rank * Lb, (rank + 1) * Lb
        for case in CASES:
            out, grads = attend(parallel.linear_attention, d, *case, lo, hi, comm=parallel.torch_group())
            # collect the blocks on every rank (plain collectives: no autograd here)
            blocks = [torch.empty_like(out) for _ in range(world)]
            dist.all_gather(blocks, out)
            full = torch.cat(blocks, dim=-2)
            gathered = []
            for g in grads[:3]:
                parts = [torch.empty_like(g) for _ in range(world)]
                dist.all_gather(parts, g)
                gathered.append(torch.cat(parts, dim=-2))
            if len(grads) == 4:  # the replicated table: each rank holds its part
                dist.all_reduce(grads[3])
                gathered.append(grads[3])
            if rank == 0:
                ref, ref_grads = attend(fastrpb.linear_attention, d, *case, 0, L)
                e1 = check(f"P={world} {case} forward vs oracle", full.numpy(), oracle(d, *case))
                e2 = check(f"P={world} {case} forward vs one process", full.numpy(), ref.numpy())
                e3 = max(
                    check(f"P={world} {case} grad {n}", a.numpy(), b.numpy())
                    for n, a, b in zip("qkvw", gathered, ref_grads, strict=False)
                )
                print(f"P={world} {case}: err oracle {e1:.1e} one process {e2:.1e} grad {e3:.1e}", flush=True)
        # the bias alone, a shared 1-d table and an odd column count
        x = torch.tensor(d["v"][0, :1, lo:hi, :3], requires_grad=True)  # (1, Lb, 3)
        w = torch.tensor(d["w"][0], requires_grad=True)
        out = parallel.rpb(x, w, comm=parallel.torch_group(), causal=True, skip=(1, 2))
        torch.sum(out * torch.tensor(d["weight"][0, :1, lo:hi, :3])).backward()
        parts = [torch.empty_like(out) for _ in range(world)]
        dist.all_gather(parts, out.detach())
        gparts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(gparts, x.grad)
        dist.all_reduce(w.grad)
        if rank == 0:
            import oracles

            xs = torch.tensor(d["v"][0, :1, :, :3], requires_grad=True)
            ws = torch.tensor(d["w"][0], requires_grad=True)
            ref = fastrpb.rpb(xs, ws, causal=True, skip=(1, 2))
            torch.sum(ref * torch.tensor(d["weight"][0, :1, :, :3])).backward()
            dense = oracles.toeplitz(d["w"][0], L, causal=True, skip=(1, 2)) @ d["v"][0, :1, :, :3]
            check(f"rpb P={world} forward vs oracle", torch.cat(parts, dim=-2).numpy(), dense)
            check(f"rpb P={world} grad v", torch.cat(gparts, dim=-2).numpy(), xs.grad.numpy())
            check(f"rpb P={world} grad w", w.grad.numpy(), ws.grad.numpy())
            print(f"rpb P={world}: forward and gradients equal", flush=True)
        dist.barrier()  # no rank tears gloo down while another still uses it
    finally:
        dist.destroy_process_group()
    # Leave without interpreter shutdown. destroy_process_group does not always end
    # gloo's worker threads (something in torch can still hold the backend, e.g. tensors
    # from its collectives), and one of them that is still freeing a finished
    # collective's Python-owned tensors when the interpreter shuts down needs the GIL,
    # is made to exit by Python, and aborts the process: "terminate called without an
    # active exception", SIGABRT (flaky, under load; seen in a core dump as
    # ProcessGroupGloo::runLoop -> ~AsyncAllgatherWork -> take_gil during Py_FinalizeEx).
    # All checks are done and the group is destroyed; exit code 0 tells mp.spawn so.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def check(name, got, want, rtol=RTOL):
    import oracles  # on the path only once the worker has set it up

    return oracles.check_relative(name, got, want, rtol=rtol)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(worlds: list[int]) -> None:
    for world in worlds:
        assert L % world == 0
        mp.spawn(worker, args=(world, free_port()), nprocs=world, join=True)
    print("OK")


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [2])
