"""Every Triton kernel compiles for real GPU targets (sm_80, sm_90), without a GPU.

The CPU tests run the kernels in Triton's interpreter, which accepts code that the
compiler rejects (a non-constexpr global, a type mismatch between branches). This
test compiles each kernel variant the launchers use, in a subprocess without
TRITON_INTERPRET (kernels are defined differently under it), with triton.compile
and the ptxas that ships with triton.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import itertools, json, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from janus.kernels import janus_loss, mask_predict_update

    def build(fn, types, constexprs, target, warps):
        names = fn.arg_names
        signature = {n: types.get(n, "constexpr") for n in names}
        src = ASTSource(fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()})
        triton.compile(src, target=GPUTarget("cuda", target, 32), options={"num_warps": warps})

    done = []
    for target in (80, 90):
        for dtype in ("bf16", "fp16", "fp32"):
            p = "*" + dtype
            loss = dict(a_ptr=p, ga_ptr=p, b_ptr=p, gb_ptr=p, c_ptr=p, gc_ptr=p, ya_ptr="*i64", y_ptr="*i64",
                        partner_ptr="*i32", part_ptr="*fp32", a_stride="i64", ga_stride="i64", b_stride="i64",
                        gb_stride="i64", c_stride="i64", gc_stride="i64", V="i32", eps="fp32", s_ar="fp32",
                        s_nar="fp32", s_aux="fp32", s_an="fp32", s_ac="fp32", s_nc="fp32", g_a="fp32",
                        ignore_index="i32")
            for has in [(1, 1, 1), (1, 0, 0), (0, 1, 0), (0, 1, 1), (1, 1, 0)]:
                for grad in (True, False):
                    flags = dict(HAS_A=bool(has[0]), HAS_B=bool(has[1]), HAS_C=bool(has[2]), WRITE_GRAD=grad,
                                 BLOCK_V=2048)
                    build(janus_loss.janus_loss_kernel, loss, flags, target, 8)
                    done.append(f"janus_loss sm_{target} {dtype} {has} grad={grad}")
            update = dict(hidden_ptr=p, weight_ptr=p, slots_ptr="*i64", banned_ptr="*i8", tokens_ptr="*i64",
                          scores_ptr="*fp32", part_max_ptr="*fp32", part_sum_ptr="*fp32", part_best_ptr="*fp32",
                          part_id_ptr="*i32", M="i32", V="i32", D="i32", L="i32", v_per_split="i32")
            update |= {n: "i64" for n in mask_predict_update._mask_predict_update_kernel.arg_names if "stride" in n}
            fp32 = dtype == "fp32"
            for final in (True, False):
                flags = dict(FINAL=final, DOT_FP32=fp32, BLOCK_M=64, BLOCK_V=128, BLOCK_D=32 if fp32 else 64)
                build(mask_predict_update._mask_predict_update_kernel, update, flags, target, 8)
                done.append(f"mask_predict_update sm_{target} {dtype} final={final}")
        combine = dict(slots_ptr="*i64", tokens_ptr="*i64", scores_ptr="*fp32", part_max_ptr="*fp32",
                       part_sum_ptr="*fp32", part_best_ptr="*fp32", part_id_ptr="*i32", M="i32", L="i32",
                       splits="i32", stride_tr="i64", stride_tl="i64", stride_sr="i64", stride_sl="i64")
        build(mask_predict_update._combine_kernel, combine, dict(BLOCK_M=64, BLOCK_S=64), target, 4)
        done.append(f"combine sm_{target}")
    print(json.dumps(done))
    """
)


@pytest.mark.triton
@pytest.mark.slow
def test_every_kernel_variant_compiles_for_sm80_and_sm90(tmp_path):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    done = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(done) == 2 * (3 * (10 + 2) + 1), done
