"""The model-based rewards are registered built-ins, built from config-style args (as `rewards[].args`
and the `ray_actor` wrapper build them: `reward_types()[type](**args)`), and mix with other rewards."""
import json

import pytest
import torch

from tiny_reward_models import CTX, image_batch, tiny_clip_dir, tiny_trocr_dir
from uniloop.rewards.base import RewardMixture, RewardSpec, reward_types

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: extra threads only contend


def test_registered_and_built_from_config_args():
    from uniloop.rewards.aesthetic import AestheticReward
    from uniloop.rewards.detector import DetectorReward
    from uniloop.rewards.hps import HPSReward
    from uniloop.rewards.image_reward import ImageRewardScore
    from uniloop.rewards.ocr import OcrReward
    from uniloop.rewards.pickscore import PickScoreReward

    types = reward_types()
    expected = {"pickscore": PickScoreReward, "hps": HPSReward, "image_reward": ImageRewardScore,
                "aesthetic": AestheticReward, "ocr": OcrReward, "detector": DetectorReward}
    for name, cls in expected.items():
        assert types[name] is cls and cls.modalities == ("image",)
    # a config's args (plain YAML/JSON values) are enough to build them; here two cheap ones, in a mixture
    cfg = json.loads(json.dumps([
        {"name": "pick", "type": "pickscore", "weight": 0.5,
         "args": {"model": str(tiny_clip_dir()), "processor": str(tiny_clip_dir()), "device": "cpu", "batch_size": 2}},
        {"name": "text", "type": "ocr", "weight": 2.0,
         "args": {"model": str(tiny_trocr_dir("cat")), "device": "cpu", "batch_size": 2, "max_new_tokens": 8}},
    ]))
    specs = [RewardSpec(c["name"], c["weight"], types[c["type"]](**c["args"])) for c in cfg]
    mix = RewardMixture(specs)
    images = torch.rand(3, 32, 32, 3, generator=torch.Generator().manual_seed(0))
    out = mix(image_batch(['a sign "cat"', 'a sign "dog"', "no quotes"], images), CTX)
    pick, text = out.components["pick"], out.components["text"]
    assert pick.valid.all() and text.valid.tolist() == [True, True, False]
    assert text.scores[:2].tolist() == [1.0, 0.0]
    # the sample whose OCR target is missing is invalid in the total too, never scored 0
    assert out.valid.tolist() == [True, True, False]
    assert torch.allclose(out.total[:2], 0.5 * pick.scores[:2] + 2.0 * text.scores[:2])


def test_weight_files_are_local_paths_or_hub_files(tmp_path):
    from uniloop.rewards.model_utils import resolve_file

    f = tmp_path / "weights.pt"
    f.write_bytes(b"x")
    assert resolve_file(str(f)) == str(f)
    with pytest.raises(FileNotFoundError, match="neither a local file"):
        resolve_file(str(tmp_path / "missing.pt"))  # an absolute path is never looked up on the hub
    with pytest.raises(FileNotFoundError, match="could not be fetched"):
        resolve_file("no-such-owner/no-such-repo/model.pt")  # offline in tests: fails fast, says both
