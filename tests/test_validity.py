"""Do the instruments measure what they claim? Known effects must show up in the numbers."""

from __future__ import annotations


from tests.jobs import NO_WANDB, TINY, check, load_run, only_run_dir, torchrun

DELAYED = "comm.hook=tests.comm_hooks:delayed_allreduce"


def summary_with_delay(root, overrides, delay_s):
    proc = torchrun(2, [*overrides, DELAYED, f"paths.root={root}"], env={"SCALING_TEST_DELAY_S": str(delay_s)})
    check(proc)
    return load_run(only_run_dir(root / "adhoc"))[0]["summary"]


def test_a_known_delay_per_bucket_shows_up_as_communication(tmp_path):
    """Each bucket's completion held back by d (one bucket at a time): busy and exposed grow by buckets x d."""
    overrides = [*TINY["mlp"], "model.layers=4", "dist.bucket_cap_mb=0.05", "train.steps=6", "train.warmup_steps=2",
                 "train.log_every=3", "instrument.flops=false"]
    delay = 0.03
    base = summary_with_delay(tmp_path / "base", overrides, 0.0)
    slow = summary_with_delay(tmp_path / "slow", overrides, delay)
    buckets = slow["comm_buckets"]
    assert buckets == base["comm_buckets"] >= 3
    expected = buckets * delay
    assert 0.75 * expected < slow["comm_s"] - base["comm_s"] < 1.35 * expected
    assert 0.6 * expected < slow["comm_exposed_s"] - base["comm_exposed_s"] < 1.35 * expected


def test_the_verdict_flips_when_communication_is_slowed(tmp_path):
    """A compute-bound job (a transformer with few parameters) turns communication-bound."""
    overrides = ["+exp=transformer", "model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.d_ff=256",
                 "model.vocab_size=512", "data.seq_len=128", "train.batch_size=8", "data.num_samples=128",
                 "train.steps=4", "train.warmup_steps=2", "train.log_every=2", "instrument.flops=false", NO_WANDB]
    base = summary_with_delay(tmp_path / "base", overrides, 0.0)
    assert base["bound"] == "compute"
    slow = summary_with_delay(tmp_path / "slow", overrides, 0.5)
    assert slow["bound"] == "communication"
    assert slow["comm_exposed_s"] - base["comm_exposed_s"] > 0.45
    assert slow["comm_exposed_frac"] > base["comm_exposed_frac"] + 0.3


def test_mlp_exposes_more_communication_than_resnet(tmp_path):
    """The premise of the experiments: the same 2 processes, a parameter-heavy model vs a compute-heavy one."""
    shares = {}
    for exp in ("mlp", "resnet"):
        root = tmp_path / exp
        proc = torchrun(2, [f"+exp={exp}", "train.steps=3", "train.warmup_steps=1", "train.log_every=3",
                            "instrument.flops=false", NO_WANDB, f"paths.root={root}"])
        check(proc)
        shares[exp] = load_run(only_run_dir(root / "adhoc"))[0]["summary"]
    assert shares["mlp"]["comm_exposed_frac"] > shares["resnet"]["comm_exposed_frac"] + 0.1
    assert shares["resnet"]["bound"] == "compute"


def test_a_blocking_hook_hides_nothing(tmp_path):
    """A hook that all-reduces before returning stalls backward: all of its time is exposed."""
    overrides = [*TINY["mlp"], "model.layers=4", "dist.bucket_cap_mb=0.05", "train.steps=4", "train.warmup_steps=1",
                 "train.log_every=2", "instrument.flops=false", "comm.hook=tests.comm_hooks:blocking_allreduce",
                 f"paths.root={tmp_path}"]
    check(torchrun(2, overrides))
    run, steps = load_run(only_run_dir(tmp_path / "adhoc"))
    # What is not exposed is the hook's own bookkeeping between the launch mark and the blocking call and the
    # host's scheduling jitter: 12-25 us per bucket over 16 steps on 2 busy cores, once 0.20 ms of an 11 ms
    # all-reduce (1.8 %) in a clean-clone suite. An exposure that missed the blocking would hide most of it;
    # the bound, a quarter of the busy time, is more than ten times the largest share seen.
    for step in steps:
        assert step["comm_buckets"] >= 3
        assert 0 <= step["comm_s"] - step["comm_exposed_s"] <= 0.25 * step["comm_s"], step
