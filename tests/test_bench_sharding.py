"""benchmarks/bench_sharding.py: the HLO collective counter, the command line and the table, without compiling."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_sharding  # noqa: E402

HLO = """\
HloModule jit_step, entry_computation_layout={(f32[8,16]{1,0})->f32[]}

%region_0 (a: f32[], b: f32[]) -> f32[] {
  ROOT %max = f32[] maximum(f32[] %a, f32[] %b)
}

ENTRY %main (p: f32[8,16]) -> f32[] {
  %all-reduce = f32[] all-reduce(%fusion), channel_id=1, replica_groups=[1,8]<=[8], to_apply=%region_0, \
metadata={op_name="jit(step)/reduce_max"}
  %all-reduce.1 = (f32[], pred[]) all-reduce(%a, %b), channel_id=2, replica_groups=[1,8]<=[8], to_apply=%region_0
  %all-reduce.2 = f32[16,17,64]{2,1,0} all-reduce(%bitcast), channel_id=3, to_apply=%add
  %all-gather = f32[64,192]{1,0} all-gather(%p), channel_id=4, dimensions={0}, metadata={op_name="all-reduce"}
  %all-gather-start = (bf16[8,16]{1,0}, bf16[64,16]{1,0}) all-gather-start(bf16[8,16]{1,0} %q), dimensions={0}
  %all-gather-done = bf16[64,16]{1,0} all-gather-done(%all-gather-start)
  %reduce-scatter = f32[8,16]{1,0} reduce-scatter(f32[64,16]{1,0} %g), dimensions={0}, to_apply=%add
  %collective-permute = s8[4]{0} collective-permute(%x), source_target_pairs={{0,1},{1,0}}
  %fusion.3 = f32[16]{0} fusion(%all-reduce.2), kind=kLoop, calls=%fused
  ROOT %r = f32[] add(%all-reduce, %all-reduce)
}
"""


def test_collectives_are_counted_by_kind_with_result_bytes():
    c = bench_sharding.count_collectives(HLO)
    assert c["all-reduce"] == dict(count=3, bytes=4 + 5 + 16 * 17 * 64 * 4, scalar=2)
    # The async pair counts once, with its output (64 x 16 bf16), not its operand.
    assert c["all-gather"] == dict(count=2, bytes=64 * 192 * 4 + 64 * 16 * 2, scalar=0)
    assert c["reduce-scatter"] == dict(count=1, bytes=8 * 16 * 4, scalar=0)
    assert c["collective-permute"] == dict(count=1, bytes=4, scalar=0)
    assert c["all-to-all"] == dict(count=0, bytes=0, scalar=0)


def test_arguments_default_to_the_issue_grid_and_put_fp32_first():
    args = bench_sharding.parse_args([])
    assert args.models == ["vit", "lm"]
    assert args.recipes == ["fp32", "fp8", "int8", "mxfp8", "nvfp4"]
    assert args.meshes == list(bench_sharding.MESHES)
    args = bench_sharding.parse_args(
        ["--recipes", "nvfp4,fp32", "--meshes", "tensor=2, data = 2;fsdp=1", "--steps", "2"]
    )
    assert args.recipes == ["fp32", "nvfp4"]
    assert args.meshes == ["data=2,tensor=2", "data=1"]
    assert args.steps == 2


@pytest.mark.parametrize(
    "argv",
    [["--models", "resnet"], ["--recipes", "fp9"], ["--meshes", "data=16"], ["--meshes", "pipe=2"], ["--steps", "0"]],
)
def test_bad_arguments_are_refused(argv, capsys):
    with pytest.raises(SystemExit):
        bench_sharding.parse_args(argv)
    assert "error" in capsys.readouterr().err


def test_sizes_read_as_bytes_kib_and_mib():
    assert bench_sharding._size(4) == "4 B"
    assert bench_sharding._size(4400) == "4.3 KiB"
    assert bench_sharding._size(-69632, sign=True) == "-68 KiB"
    assert bench_sharding._size(14_308_000, sign=True) == "+13.6 MiB"


def test_table_compares_each_recipe_with_fp32_on_its_mesh():
    base = bench_sharding.count_collectives("")
    more = bench_sharding.count_collectives(HLO)
    common = dict(model="vit", load_average="1.00 1.00 1.00", step_ms=10.0)
    records = [
        dict(common, mesh="fsdp=8", recipe="fp32", collectives=base, vs_fp32=1.0),
        dict(common, mesh="fsdp=8", recipe="fp8", collectives=more, vs_fp32=1.5),
        dict(
            model="vit",
            mesh="fsdp=8",
            recipe="mxfp8",
            refused="x split over 'fsdp' leaves 8 elements",
            load_average="1",
        ),
    ]
    header = dict(
        cores=2,
        cpu="cpu",
        rounds=5,
        commit="abc",
        jax="0",
        jaxlib="0",
        flax="0",
        load_before="1",
        load_after="2",
        date="today",
        command="python benchmarks/bench_sharding.py",
    )
    rows = [line for line in bench_sharding.table(records, header).splitlines() if line.startswith("| fsdp=8")]
    assert rows[0].startswith("| fsdp=8 | fp32 | 10.0 | 1.00 | 0 | 0 | 0 | 0 | 0 | — |")
    assert "| 2 / 50 KiB | 1 / 512 B | 3 (2 scalar) / 68 KiB | 1 / 4 B | 0 |" in rows[1]
    assert "AG +2 (+50 KiB); RS +1 (+512 B); AR +3, +2 scalar (+68 KiB); CP +1 (+4 B) |" in rows[1]
    assert "refused: x split over 'fsdp'" in rows[2]
