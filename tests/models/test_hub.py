"""``hf:<repo>`` checkpoints and tokenizers, offline, from a Hugging Face cache built here.

Tiny CLIP and ViT repositories are written in the published transformers layout
(``config.json`` + ``model.safetensors`` with the published tensor names, and CLIP's
``vocab.json`` + ``merges.txt``) into a temporary cache laid out as huggingface_hub lays
it out (``models--org--name/{blobs,refs/main,snapshots/<commit>}``). With
``HF_HUB_OFFLINE=1`` and ``HF_HOME`` pointing there, ``hf:org/name`` must load through
``models.build`` into the same parameters as the files read by local path.
"""

import hashlib
import json
import os

import chex
import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from trm_jax import models
from trm_jax.errors import CheckpointError, ConfigError
from trm_jax.models import hub, loaders, tokenizer, vit

COMMIT = "0123456789abcdef0123456789abcdef01234567"
SAMPLES = [
    "a photo of a cat.",
    "A Bad PHOTO of the  airplane!",
    "it's a ship's photo; they're here.",
    "2 frogs, 42 deer",
    "café naïve über",
    "unseen zebra words?!",
    "",
]


def put_in_cache(cache: str, repo_id: str, files: dict, commit: str = COMMIT) -> str:
    """Store ``files`` (name -> local path) as huggingface_hub does: content-addressed
    blobs, a snapshot folder of relative symlinks, ``refs/main`` -> commit."""
    repo = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    snapshot = os.path.join(repo, "snapshots", commit)
    os.makedirs(os.path.join(repo, "blobs"), exist_ok=True)
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    os.makedirs(snapshot, exist_ok=True)
    for name, src in files.items():
        with open(src, "rb") as f:
            content = f.read()
        blob = hashlib.sha256(content).hexdigest()
        with open(os.path.join(repo, "blobs", blob), "wb") as f:
            f.write(content)
        os.symlink(os.path.join("..", "..", "blobs", blob), os.path.join(snapshot, name))
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(commit)
    return snapshot


def clip_config_json(v) -> dict:
    """A transformers ``CLIPConfig`` dict for ``v`` (the fields the published one has)."""
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": v.projection_dim,
        "logit_scale_init_value": 2.6592,
        "text_config": {
            "hidden_size": v.text_width,
            "intermediate_size": v.text_mlp_dim,
            "num_hidden_layers": v.text_layers,
            "num_attention_heads": v.text_heads,
            "vocab_size": v.vocab_size,
            "max_position_embeddings": v.context_length,
            "hidden_act": "quick_gelu",
            "eos_token_id": 2,
        },
        "vision_config": {
            "hidden_size": v.vision_width,
            "intermediate_size": v.vision_mlp_dim,
            "num_hidden_layers": v.vision_layers,
            "num_attention_heads": v.vision_heads,
            "image_size": v.image_size,
            "patch_size": v.patch_size,
            "hidden_act": "quick_gelu",
        },
    }


def vit_config_json(v, *, hidden_act="gelu", eps=1e-12) -> dict:
    """A transformers ``ViTConfig`` dict (gelu / 1e-12 as in google/vit-base-patch16-224-in21k)."""
    return {
        "architectures": ["ViTModel"],
        "model_type": "vit",
        "hidden_size": v.width,
        "num_hidden_layers": v.depth,
        "num_attention_heads": v.heads,
        "intermediate_size": v.mlp_dim,
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "num_channels": v.channels,
        "hidden_act": hidden_act,
        "layer_norm_eps": eps,
        "qkv_bias": True,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
    }


def _write_json(path, obj) -> str:
    with open(path, "w") as f:
        json.dump(obj, f)
    return str(path)


@pytest.fixture()
def hf_cache(tmp_path, monkeypatch) -> str:
    """An empty hub cache under ``HF_HOME``, offline."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = str(tmp_path / "hf_home" / "hub")
    os.makedirs(cache)
    return cache


@pytest.fixture(scope="module")
def clip_repo(tiny_clip, corpus, tmp_path_factory):
    """Files of a tiny CLIP repository (name -> path) and the parameters written."""
    folder = tmp_path_factory.mktemp("clip_repo")
    params, text_params = loaders.create_checkpoint(
        tiny_clip, str(folder / "model.safetensors"), seed=3
    )
    texts, num_merges = corpus
    vocab_json, merges_txt = tokenizer.write_hf_vocab(
        str(folder), tokenizer.learn_merges(texts, num_merges)
    )
    # Key order of the published vocab.json is not id order; ids must come from the values.
    table = json.load(open(vocab_json))
    items = list(table.items())
    np.random.default_rng(0).shuffle(items)
    _write_json(vocab_json, dict(items))
    files = {
        "model.safetensors": str(folder / "model.safetensors"),
        "config.json": _write_json(folder / "config.json", clip_config_json(tiny_clip)),
        "vocab.json": vocab_json,
        "merges.txt": merges_txt,
    }
    return files, params, text_params


@pytest.fixture(scope="module")
def pooled_vit(tiny_vit):
    """``tiny_vit`` with a pre_logits layer (the in21k release has one: HF's pooler)."""
    import dataclasses

    return dataclasses.replace(tiny_vit, representation_size=tiny_vit.width)


@pytest.fixture(scope="module")
def vit_repo(pooled_vit, tmp_path_factory):
    folder = tmp_path_factory.mktemp("vit_repo")
    leaves, treedef = jax.tree.flatten(vit.init_params(pooled_vit, jax.random.key(4)))
    keys = jax.random.split(jax.random.key(5), len(leaves))
    params = treedef.unflatten(  # no trivial LayerNorm scales / zero biases
        [p + 0.05 * jax.random.normal(k, p.shape) for k, p in zip(keys, leaves, strict=True)]
    )
    loaders.save_vit_safetensors(str(folder / "model.safetensors"), params)
    files = {
        "model.safetensors": str(folder / "model.safetensors"),
        "config.json": _write_json(folder / "config.json", vit_config_json(pooled_vit)),
    }
    return files, params


def _vit_cfg(v, **kw):
    cfg = models.default_config()
    cfg.update(
        name="vit_tiny",
        image_size=v.image_size,
        patch_size=v.patch_size,
        channels=v.channels,
        width=v.width,
        depth=v.depth,
        heads=v.heads,
        mlp_dim=v.mlp_dim,
        representation_size=v.representation_size,
    )
    cfg.update(kw)
    return cfg


# ------------------------------------------------------------------------ spec and cache


def test_spec_parsing_and_commands():
    assert hub.is_hub("hf:openai/clip-vit-base-patch16") and not hub.is_hub("/w/model.npz")
    assert hub.parse("hf:openai/clip-vit-base-patch16") == ("openai/clip-vit-base-patch16", None)
    spec = hub.parse("hf:google/vit-base-patch16-224-in21k@abc123")
    assert spec == ("google/vit-base-patch16-224-in21k", "abc123")
    assert str(spec) == "hf:google/vit-base-patch16-224-in21k@abc123"
    for bad in ("hf:", "hf:a/b/c", "hf:org/name@", "hf:/name", "hf:org name"):
        with pytest.raises(ConfigError, match="malformed hub spec"):
            hub.parse(bad)
    assert hub.files_for("clip") == ("model.safetensors", "config.json", "vocab.json", "merges.txt")
    assert hub.files_for("vit") == ("model.safetensors", "config.json")
    assert (
        hub.download_command("hf:openai/clip-vit-base-patch16", hub.files_for("clip"))
        == "hf download openai/clip-vit-base-patch16 model.safetensors config.json vocab.json "
        "merges.txt"
    )
    assert hub.download_command("hf:o/n@v1", ["config.json"]) == (
        "hf download o/n config.json --revision v1"
    )


def test_cache_dir_and_offline_follow_the_environment(monkeypatch, tmp_path):
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.cache_dir() == str(tmp_path / "xdg" / "huggingface" / "hub")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub.cache_dir() == str(tmp_path / "home" / "hub")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert hub.cache_dir() == str(tmp_path / "cache")
    assert not hub.offline()
    for value, expected in (("1", True), ("true", True), ("0", False), ("", False)):
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
        assert hub.offline() is expected


# ------------------------------------------------------------------------------- CLIP


def test_clip_from_hub_loads_like_the_local_files(
    hf_cache, clip_repo, tiny_clip, vocab_path, monkeypatch
):
    files, params, text_params = clip_repo
    spec = "hf:org/tiny-clip"
    assert [r["present"] for r in hub.status(spec, hub.files_for("clip"))] == [False] * 4
    snapshot = put_in_cache(hf_cache, "org/tiny-clip", files)

    report = hub.status(spec, hub.files_for("clip"))
    assert [r["file"] for r in report] == list(hub.files_for("clip"))
    for r in report:
        assert r["present"] and r["revision"] == "main" and r["cache_dir"] == hf_cache
        assert r["path"] == os.path.join(snapshot, r["file"])
        assert r["size"] == os.path.getsize(files[r["file"]])
        assert r["command"].startswith("hf download org/tiny-clip model.safetensors")
    paths = hub.resolve(spec, hub.files_for("clip"))
    assert paths == {name: os.path.join(snapshot, name) for name in files}

    monkeypatch.setitem(models.MODELS, "clip_tiny", tiny_clip)
    cfg = models.default_config()
    cfg.update(name="clip_tiny", checkpoint=spec, head="zeroshot", templates=("a photo of a {}.",))
    from_hub = models.build(cfg, key=jax.random.key(0))
    local = loaders.load_clip_safetensors(files["model.safetensors"], tiny_clip)
    chex.assert_trees_all_equal(from_hub.params, local.params, params)
    chex.assert_trees_all_equal(from_hub.text_params, local.text_params, text_params)

    # Zero-shot rows: the repo's vocab.json + merges.txt against the BPE-file tokenizer.
    names = ["cat", "dog", "frog"]
    rows_hub = models.zeroshot_head(from_hub, names, cfg)
    cfg_bpe = cfg.copy_and_resolve_references()
    cfg_bpe.update(checkpoint=files["model.safetensors"], tokenizer_vocab=vocab_path)
    rows_bpe = models.zeroshot_head(from_hub, names, cfg_bpe)
    np.testing.assert_array_equal(np.asarray(rows_hub), np.asarray(rows_bpe))

    pinned = hub.resolve(f"hf:org/tiny-clip@{COMMIT}", ["config.json"])
    assert pinned["config.json"] == os.path.join(snapshot, "config.json")


def test_repo_tokenizer_files_match_the_bpe_file(hf_cache, clip_repo, vocab_path):
    files, _, _ = clip_repo
    put_in_cache(hf_cache, "org/tiny-clip", files)
    bpe = tokenizer.ClipTokenizer(vocab_path, context_length=16)
    cfg = models.default_config()
    cfg.update(checkpoint="hf:org/tiny-clip")
    from_repo = models.clip_tokenizer(cfg)  # '' tokenizer_vocab: the checkpoint's repo
    cfg.update(checkpoint="", tokenizer_vocab="hf:org/tiny-clip")
    named = models.clip_tokenizer(cfg)
    cfg.update(tokenizer_vocab=os.path.dirname(files["vocab.json"]))
    folder = models.clip_tokenizer(cfg)
    for tok in (from_repo, named, folder):
        assert (tok.vocab_size, tok.sot_token_id, tok.eot_token_id) == (
            bpe.vocab_size,
            bpe.sot_token_id,
            bpe.eot_token_id,
        )
        for text in SAMPLES:
            assert tok.encode(text) == bpe.encode(text), text
        np.testing.assert_array_equal(tok(SAMPLES, 16), bpe(SAMPLES))


def test_vocab_json_must_cover_the_merges(clip_repo, tmp_path):
    files, _, _ = clip_repo
    table = json.load(open(files["vocab.json"]))
    table.pop("photo</w>")
    bad = _write_json(tmp_path / "vocab.json", table)
    with pytest.raises(CheckpointError, match=r"lacks 1 tokens .*photo</w>"):
        tokenizer.ClipTokenizer(files["merges.txt"], vocab_json=bad)


# -------------------------------------------------------------------------------- ViT


def test_vit_safetensors_has_the_published_names(vit_repo, pooled_vit):
    files, params = vit_repo
    tensors = load_file(files["model.safetensors"])
    block = [
        "attention.attention.query",
        "attention.attention.key",
        "attention.attention.value",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
        "layernorm_before",
        "layernorm_after",
    ]
    published = {
        "embeddings.cls_token",
        "embeddings.position_embeddings",
        "embeddings.patch_embeddings.projection.weight",
        "embeddings.patch_embeddings.projection.bias",
        "layernorm.weight",
        "layernorm.bias",
        "pooler.dense.weight",
        "pooler.dense.bias",
    } | {
        f"encoder.layer.{i}.{m}.{leaf}"
        for i in range(pooled_vit.depth)
        for m in block
        for leaf in ("weight", "bias")
    }
    assert set(tensors) == published
    d = pooled_vit.width
    mha = "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/"
    flat = models.common.flatten(params)
    np.testing.assert_array_equal(
        tensors["encoder.layer.0.attention.attention.query.weight"],
        np.asarray(flat[mha + "query/kernel"]).reshape(d, d).T,
    )
    np.testing.assert_array_equal(
        tensors["encoder.layer.0.attention.output.dense.weight"],
        np.asarray(flat[mha + "out/kernel"]).reshape(d, d).T,
    )
    assert tensors["embeddings.patch_embeddings.projection.weight"].shape == (d, 3, 8, 8)


def test_vit_from_hub_loads_like_the_local_files(hf_cache, vit_repo, pooled_vit, tmp_path):
    files, params = vit_repo
    put_in_cache(hf_cache, "google/tiny-vit-in21k", files)
    cfg = _vit_cfg(pooled_vit, checkpoint="hf:google/tiny-vit-in21k")
    from_hub = models.build(cfg, key=jax.random.key(0))
    local = loaders.load_vit_safetensors(files["model.safetensors"], pooled_vit)
    chex.assert_trees_all_close(from_hub.params, local, params, atol=0, rtol=0)
    # The same weights as a vision_transformer .npz load into the same tree.
    npz = str(tmp_path / "vit.npz")
    loaders.save_vit_npz(npz, params)
    chex.assert_trees_all_equal(loaders.load_vit_npz(npz, pooled_vit), local)
    # An image-classifier file (vit. prefix, classifier head) and transformers-5 names.
    tensors = load_file(files["model.safetensors"])
    from safetensors.numpy import save_file

    prefixed = {"vit." + k: v for k, v in tensors.items()}
    prefixed["classifier.weight"] = np.zeros((5, pooled_vit.width), np.float32)
    save_file(prefixed, str(tmp_path / "cls.safetensors"))
    chex.assert_trees_all_equal(
        loaders.load_vit_safetensors(str(tmp_path / "cls.safetensors"), pooled_vit), local
    )
    renamed = {}
    for k, v in tensors.items():
        for old, new in (
            ("encoder.layer.", "layers."),
            ("attention.attention.query", "attention.q_proj"),
            ("attention.attention.key", "attention.k_proj"),
            ("attention.attention.value", "attention.v_proj"),
            ("attention.output.dense", "attention.o_proj"),
            ("intermediate.dense", "mlp.fc1"),
            (".output.dense", ".mlp.fc2"),
        ):
            k = k.replace(old, new)
        renamed[k] = v
    save_file(renamed, str(tmp_path / "v5.safetensors"))
    chex.assert_trees_all_equal(
        loaders.load_vit_safetensors(str(tmp_path / "v5.safetensors"), pooled_vit), local
    )


def test_vit_pooler_needs_representation_size(hf_cache, vit_repo, pooled_vit):
    files, _ = vit_repo
    put_in_cache(hf_cache, "google/tiny-vit-in21k", files)
    cfg = _vit_cfg(pooled_vit, checkpoint="hf:google/tiny-vit-in21k", representation_size=0)
    with pytest.raises(CheckpointError, match=r"extra 2 .*representation_size=32"):
        models.build(cfg, key=jax.random.key(0))
    cfg.update(representation_size=pooled_vit.width, checkpoint_format="npz")
    with pytest.raises(ConfigError, match="safetensors"):
        models.build(cfg, key=jax.random.key(0))


def test_hub_repo_of_the_wrong_model_type(hf_cache, vit_repo, pooled_vit, tmp_path):
    files, _ = vit_repo
    clip_like = dict(
        files, **{"config.json": _write_json(tmp_path / "c.json", {"model_type": "clip"})}
    )
    put_in_cache(hf_cache, "org/not-a-vit", clip_like)
    with pytest.raises(CheckpointError, match="holds a 'clip' model, not a 'vit' one"):
        models.build(_vit_cfg(pooled_vit, checkpoint="hf:org/not-a-vit"), key=jax.random.key(0))


def test_vit_safetensors_matches_transformers(vit_repo, pooled_vit, tmp_path):
    """transformers' own ViTModel reads our file as the published layout (no missing or
    unexpected keys) and computes the same pooled features."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    files, params = vit_repo
    folder = tmp_path / "repo"
    folder.mkdir()
    os.symlink(files["model.safetensors"], folder / "model.safetensors")
    config = vit_config_json(pooled_vit, hidden_act="gelu_pytorch_tanh", eps=1e-6)
    _write_json(folder / "config.json", config)
    model, info = transformers.ViTModel.from_pretrained(str(folder), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    images = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        ref = model.eval()(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
    backbone = models.make_backbone(pooled_vit, params)
    ours = jax.jit(backbone.features_fn)(params, images)
    np.testing.assert_allclose(np.asarray(ours), ref.pooler_output.numpy(), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------- missing files


def test_missing_repo_offline_is_one_line(hf_cache, tiny_clip, monkeypatch):
    monkeypatch.setitem(models.MODELS, "clip_tiny", tiny_clip)
    cfg = models.default_config()
    cfg.update(name="clip_tiny", checkpoint="hf:nobody/absent-clip")
    with pytest.raises(CheckpointError) as err:
        models.build(cfg, key=jax.random.key(0))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("hf:nobody/absent-clip: model.safetensors, config.json, ")
    assert hf_cache in message and "HF_HUB_OFFLINE is set" in message
    assert message.endswith(
        "fetch with: hf download nobody/absent-clip model.safetensors config.json "
        "vocab.json merges.txt"
    )
    report = hub.status("hf:nobody/absent-clip")
    assert [(r["present"], r["path"], r["size"]) for r in report] == [(False, None, None)] * 2


def test_partial_cache_and_downloads_off(hf_cache, clip_repo, monkeypatch):
    files, _, _ = clip_repo
    weights = {k: files[k] for k in hub.WEIGHT_FILES}
    put_in_cache(hf_cache, "org/weights-only", weights)
    with pytest.raises(CheckpointError, match=r"^hf:org/weights-only: vocab.json, merges.txt not"):
        hub.resolve("hf:org/weights-only", hub.files_for("clip"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert set(hub.resolve("hf:org/weights-only", download=False)) == set(hub.WEIGHT_FILES)
    with pytest.raises(CheckpointError, match=r"\(downloads are off\); fetch with: hf download"):
        hub.resolve("hf:org/weights-only", hub.TOKENIZER_FILES, download=False)
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache"):
        hub.resolve(f"hf:org/weights-only@{'f' * 40}", download=False)


def _hub_error(name: str, message: str) -> Exception:
    """An instance of huggingface_hub's error ``name`` (their constructors want a response)."""
    from huggingface_hub import errors

    cls = getattr(errors, name)
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    return err


@pytest.mark.parametrize(
    "error, expected",
    [
        (
            "LocalEntryNotFoundError",
            "vocab.json not in the Hugging Face cache .* could not be reached",
        ),
        ("RepositoryNotFoundError", "no such Hugging Face repository, or it is private or gated"),
        ("RevisionNotFoundError", "revision main not found in org/tiny-clip"),
        ("EntryNotFoundError", "the repository has no file vocab.json"),
        ("OSError", r"downloading vocab.json failed \(connection reset\)"),
    ],
)
def test_online_uses_the_cache_and_maps_hub_errors(
    hf_cache, clip_repo, monkeypatch, error, expected
):
    """Online, a cached file is used without any request; a failed download of a missing
    one becomes a one-line ``CheckpointError`` (hub errors simulated: no network here)."""
    import huggingface_hub

    files, _, _ = clip_repo
    put_in_cache(hf_cache, "org/tiny-clip", {"config.json": files["config.json"]})
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    calls = []

    def fake_download(repo_id, filename, **kw):
        calls.append(filename)
        if error == "OSError":
            raise OSError("connection reset\nwhile reading")
        raise _hub_error(error, f"{error} for {repo_id}/{filename}\nmore lines")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert hub.resolve("hf:org/tiny-clip", ["config.json"])["config.json"].endswith("config.json")
    assert calls == []
    with pytest.raises(CheckpointError, match=f"^hf:org/tiny-clip: {expected}") as err:
        hub.resolve("hf:org/tiny-clip", ["config.json", "vocab.json"])
    assert calls == ["vocab.json"] and "\n" not in str(err.value)
