"""Shared fixtures. Tests never touch the hub: HF_HUB_OFFLINE=1 makes an accidental download fail
fast instead of retrying for ~46 s."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matmuls: extra threads only add contention on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_janus_dir(tmp_path_factory):
    """A tiny real Janus checkpoint written with save_pretrained (built once per session)."""
    from uniloop.policies.tiny import build_tiny_janus
    return build_tiny_janus(tmp_path_factory.mktemp("models") / "tiny_janus", seed=0)


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory):
    """A tiny real StableDiffusion3Pipeline directory (built once per session: ~10 s)."""
    from uniloop.policies.flow_tiny import build_tiny_sd3
    return build_tiny_sd3(tmp_path_factory.mktemp("models") / "tiny_sd3", seed=0)


@pytest.fixture()
def tiny_policy(tiny_janus_dir):
    from uniloop.policies.janus import JanusPolicy
    return JanusPolicy.from_pretrained(tiny_janus_dir)


def perturb_adapter(policy, scale=0.5, seed=0, module=None):
    """Give a fresh LoRA adapter non-zero B weights so the adapter changes the outputs
    (`module`: where the adapter sits, default policy.model; an SD3 policy's is policy.transformer)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in (module if module is not None else policy.model).named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture()
def two_node_cluster(monkeypatch):
    """Two Ray nodes on loopback (ray.cluster_utils.Cluster), 1 CPU each, not connected to this process:
    yields (cluster, worker node); the code under test joins with `ray.address=cluster.address`."""
    import shutil
    import tempfile

    import ray._private.utils
    from ray.cluster_utils import Cluster

    # Cluster records its address in /tmp/ray/ray_current_cluster whatever temp_dir says; the tests pass
    # the address explicitly, and other Ray users on this machine keep their `ray.init(address="auto")`
    monkeypatch.setattr(ray._private.utils, "write_ray_address", lambda *a, **k: None)
    tmp = tempfile.mkdtemp(prefix="ulcl", dir="/tmp")  # short: Ray's socket paths must stay < 107 bytes
    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 1, "temp_dir": tmp, "include_dashboard": False})
    try:
        worker = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        yield cluster, worker
    finally:
        cluster.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
