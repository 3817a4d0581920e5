"""Console scripts: jointgen-make-recipe1m, jointgen-preprocess and jointgen-w2v end to end on a
tiny synthetic set (composed in-process), and their one-line errors for bad input (subprocess)."""

from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_dir

from helpers import run_cli
from jointgen import CONF_DIR
from jointgen.data.recipe1m.synthetic import main as make_main
from jointgen.data.word2vec import load_vectors
from jointgen.preprocess import run_preprocess
from jointgen.w2v import run_w2v


def compose_app(name, overrides):
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        return compose(config_name=name, overrides=overrides)


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    data = root / "data" / "recipe1m"
    make_main([str(data), "--num-recipes", "120", "--no-images"])
    args = [
        f"paths.data_dir={root / 'data'}",
        "data.preprocess.verify_images=none",
        "data.preprocess.require_images=false",
        "data.features.min_df=2",
        "data.features.action_min_count=3",
        "data.features.utensil_min_count=3",
    ]
    out = run_preprocess(compose_app("preprocess", ["data=recipe1m", *args]))
    assert out["cache"]["num_recipes"] == 120 and out["features"]["num_terms"] > 20
    w2v = [
        "data.vocab.train.vector_size=8",
        "data.vocab.train.epochs=1",
        "data.vocab.train.min_count=2",
    ]
    run_w2v(compose_app("w2v", ["data=recipe1m", f"paths.data_dir={root / 'data'}", *w2v]))
    return root, data


def test_pipeline_outputs(pipeline_dir):
    _, data = pipeline_dir
    meta = json.loads((data / "cache" / "meta.json").read_text())
    assert meta["num_recipes"] == 120 and meta["keyterms"]["rating"] == "tfidf"
    words, vecs = load_vectors(data / "vocab.bin")
    assert vecs.shape == (len(words), 8) and "olive_oil" in words
    assert (data / "vocab.txt").read_text().split("\n")[:-1] == words
    assert "olive_oil" in (data / "tokenized_text.txt").read_text()


def test_synthetic_config_prepares_everything(tmp_path):
    from hydra.utils import instantiate

    cfg = compose_app(
        "preprocess",
        [
            "data=recipe1m_synthetic",
            f"paths.data_dir={tmp_path}",
            "data.synthetic.num_recipes=60",
            "data.synthetic.image_size=24",
            "data.vocab.train.vector_size=8",
            "data.vocab.train.epochs=1",
            "data.image_size=16",
            "data.resize=20",
            "data.batch_size=4",
            "data.num_workers=0",
        ],
    )
    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    b = next(iter(dm.train_dataloader()))
    assert b["image"].shape == (4, 3, 16, 16) and b["keyterms"].shape == (4, dm.num_keyterms)
    assert dm.num_classes == 17 and b["instructions"].max() < dm.vocab_size


def test_truncated_vocab_bin_is_one_line(pipeline_dir, tmp_path):
    root, data = pipeline_dir
    cut = tmp_path / "vocab.bin"
    cut.write_bytes((data / "vocab.bin").read_bytes()[:300])
    r = run_cli(["jointgen-w2v", f"check={cut}"], root)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: {cut}: truncated at word")


def test_malformed_json_is_one_line(pipeline_dir, tmp_path):
    root, data = pipeline_dir
    bad = tmp_path / "data" / "recipe1m"
    bad.mkdir(parents=True)
    for name in ("layer2.json", "det_ingrs.json"):
        (bad / name).write_bytes((data / name).read_bytes())
    text = (data / "layer1.json").read_text()
    (bad / "layer1.json").write_text(text.replace('", "partition"', '" "partition"', 3))
    r = run_cli(
        ["jointgen-preprocess", "data=recipe1m", f"paths.data_dir={tmp_path / 'data'}"], root
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {bad / 'layer1.json'}: malformed JSON at line 2 column ")
    assert last.endswith("Expecting ',' delimiter")
