"""Compile the Triton backend's kernels ahead of time for an NVIDIA GPU, without one.

For each kernel configuration the dispatcher can pick
(:func:`moglstm.nn.backends.triton.kernel_configs`), ``triton.compile`` with a
``GPUTarget`` produces PTX and a cubin; this reports the shared memory per block
(Triton's metadata), and from the cubin Triton built (``cuobjdump`` from the triton
wheel) registers, spills (stack or local memory, LDL/STL in the SASS) and whether the
SASS holds tensor-core instructions (HMMA, HGMMA); where cuobjdump is absent, registers
and spills come from the wheel's ``ptxas -v`` and tensor cores go unchecked. Needs no
GPU and no driver.

    python benchmarks/triton_aot.py --arch 90 --which widest --json aot.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

H100_SHARED_LIMIT = 232_448  # bytes of shared memory one block may use on sm_90
A100_SHARED_LIMIT = 166_912  # sm_80
SHARED_LIMIT = {90: H100_SHARED_LIMIT, 80: A100_SHARED_LIMIT}


def _tool(name: str) -> Path | None:
    import triton

    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    path = bin_dir / name
    return path if path.exists() else None


def _ptxas_report(ptx: str, arch: int, workdir: Path) -> dict:
    """Registers and spills from ``ptxas -v`` (the wheel's ptxas, or its Blackwell-capable
    twin for PTX versions the first does not read), where cuobjdump is absent. Its
    default options are not Triton's, so it can differ a little from the cubin Triton
    built (seen: 72 registers and 8 bytes spilled where Triton's cubin had 80 and none)."""
    src = workdir / "k.ptx"
    src.write_text(ptx)
    target = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    err = ""
    for name in ("ptxas", "ptxas-blackwell"):
        tool = _tool(name)
        if tool is None:
            continue
        cmd = [str(tool), f"-arch={target}", "-v", str(src), "-o", str(workdir / "k.o")]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode == 0:
            text = done.stdout + done.stderr
            regs = re.search(r"Used (\d+) registers", text)
            spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
            return {
                "registers": int(regs.group(1)) if regs else None,
                "stack": None,
                "spills": bool(spill) and (int(spill.group(1)) + int(spill.group(2))) > 0,
                "tensor_cores": None,
                "tool": name,
            }
        err = done.stderr[-500:]
    raise RuntimeError(f"no ptxas from the triton wheel could assemble the PTX: {err}")


def _cubin_report(cubin: bytes, workdir: Path) -> dict | None:
    """Registers, stack and local memory of the cubin Triton built, and whether its SASS
    holds tensor-core instructions (HMMA, or HGMMA on sm_90) and local loads/stores
    (spills): from ``cuobjdump`` in the triton wheel, or None where it is absent."""
    tool = _tool("cuobjdump")
    if tool is None:
        return None
    path = workdir / "k.cubin"
    path.write_bytes(cubin)

    def dump(flag: str) -> str:
        done = subprocess.run([str(tool), flag, str(path)], capture_output=True, text=True)
        done.check_returncode()
        return done.stdout

    usage = dump("--dump-resource-usage")
    sass = dump("--dump-sass")
    field = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", usage)}
    spilled = bool(re.search(r"\b(LDL|STL)\b", sass)) or field.get("LOCAL", 0) > 0
    return {
        "registers": field.get("REG"),
        "stack": field.get("STACK", 0),
        "spills": spilled or field.get("STACK", 0) > 0,
        "tensor_cores": bool(re.search(r"\bH(G)?MMA", sass)),
        "tool": "cuobjdump",
    }


def compile_config(
    kernel: str, dtype: str, constexprs: dict, warps: int, arch: int, aligned: bool = False
) -> dict:
    """Compile one configuration for ``sm_{arch}``; its resource report. ``aligned``:
    every pointer argument known 16-byte aligned, as Triton specialises a launch whose
    pointers are (every one at the target shape), which vectorises loads and stores and
    changes the register allocation; without it, the generic binary."""
    os.environ.pop("TRITON_INTERPRET", None)  # this process compiles, never interprets
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from moglstm.nn.backends import triton_kernels
    from moglstm.nn.backends.triton import CELL_F32, CELL_POINTERS

    fn = getattr(triton_kernels, kernel)

    def pointer(name: str) -> str:  # the cell state's are float32 in every dtype
        return "*fp32" if CELL_F32 and name in CELL_POINTERS else f"*{dtype}"

    signature = {
        name: "constexpr"
        if name in constexprs
        else (pointer(name) if name.endswith("_ptr") else "i32")
        for name in fn.arg_names
    }
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(fn.arg_names)
        if aligned and name.endswith("_ptr")
    }
    source = ASTSource(fn=fn, signature=signature, constexprs=dict(constexprs), attrs=attrs)
    target = GPUTarget("cuda", arch, 32)
    compiled = triton.compile(source, target=target, options={"num_warps": warps})
    report = {
        "kernel": kernel,
        "dtype": dtype,
        "arch": arch,
        "constexprs": constexprs,
        "aligned": aligned,
        "shared": compiled.metadata.shared,
        "num_warps": compiled.metadata.num_warps,
    }
    with tempfile.TemporaryDirectory() as tmp:
        found = _cubin_report(compiled.asm["cubin"], Path(tmp))
        report.update(found or _ptxas_report(compiled.asm["ptx"], arch, Path(tmp)))
    return report


def _compile_star(args):
    return compile_config(*args)


def compile_all(
    arch: int,
    which: str = "all",
    jobs: int | None = None,
    only: str | None = None,
    aligned: tuple[bool, ...] = (False,),
) -> list[dict]:
    from moglstm.nn.backends.triton import kernel_configs

    todo = [
        (kernel, dtype, cx, warps, arch, a)
        for kernel, dtype, cx, warps in kernel_configs(which)
        if only is None or dtype == only
        for a in aligned
    ]
    jobs = jobs or os.cpu_count() or 1
    if jobs == 1:
        return [_compile_star(t) for t in todo]
    with ProcessPoolExecutor(jobs) as pool:
        return list(pool.map(_compile_star, todo))


def problems(reports: list[dict]) -> list[str]:
    """What breaks the limits: shared memory, spills, and (bf16/fp16 products) no tensor
    cores, where cuobjdump could tell."""
    out = []
    for r in reports:
        aligned = " aligned" if r.get("aligned") else ""
        label = f"{r['kernel']} {r['dtype']} sm_{r['arch']}{aligned} {r['constexprs']}"
        if r["shared"] > SHARED_LIMIT[r["arch"]]:
            out.append(f"{label}: {r['shared']} B of shared memory")
        if r["spills"]:
            out.append(f"{label}: spills registers to local memory")
        has_dot = r["kernel"] != "cell_backward_kernel"
        if has_dot and r["dtype"] in ("bf16", "fp16") and r["tensor_cores"] is False:
            out.append(f"{label}: no tensor-core instructions")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    parser.add_argument("--which", choices=("all", "widest"), default="all")
    parser.add_argument("--only", choices=("fp32", "fp16", "bf16"), help="one operand dtype")
    parser.add_argument("--jobs", type=int, help="compile processes (default: all cores)")
    parser.add_argument("--json", metavar="PATH", help="write every report here")
    parser.add_argument(
        "--aligned",
        choices=("no", "yes", "both"),
        default="no",
        help="pointers known 16-byte aligned (as at the target shape), generic, or both",
    )
    args = parser.parse_args(argv)
    aligned = {"no": (False,), "yes": (True,), "both": (False, True)}[args.aligned]
    reports = [
        r
        for arch in args.arch
        for r in compile_all(arch, args.which, args.jobs, args.only, aligned)
    ]
    if args.json:
        Path(args.json).write_text(json.dumps(reports, indent=1))
    for r in reports:
        print(
            f"{r['kernel']:22} {r['dtype']} sm_{r['arch']}{'a' if r['aligned'] else ' '} "
            f"shared {r['shared']:6d} B "
            f"regs {r['registers']} spills {r['spills']} "
            f"tensor-cores {r['tensor_cores']} {r['constexprs']}"
        )
    bad = problems(reports)
    print(f"{len(reports)} configurations, {len(bad)} problems")
    for line in bad:
        print("  " + line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
