"""On the training thread, inside the user's step: the hooks and what they compute.

    collector.py   the forward and optimizer hooks; builds a sample on sampled steps
    signals.py     the always-on per-step signals (loss, NaN, input fingerprint), cheap, on device
    stats.py       statistics and histograms: pure functions, tensor in, tensor out
    tensors.py     `HostCopy`: the one device-to-host copy of a sample (resolved by the sender thread)
    sampling.py    when to sample: every N steps or adaptively within a cost budget
    model_info.py  what run_start says about the model and the optimizer

Everything here must cost the training as little as it can and never raise into it.
"""
