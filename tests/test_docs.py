"""The README, the docker files and CI say what the code does."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pio_fvlm_vllm.settings import ENV_PREFIX, PioFvlmSettings

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DOCS = {path.name: path.read_text() for path in sorted((ROOT / "docs").glob("*.md"))}


def test_ci_runs_the_readme_test_command():
    assert "bash scripts/test.sh" in README and "bash scripts/setup_cpu.sh" in README
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def test_every_setting_is_documented_and_every_documented_variable_exists():
    from pio_fvlm_vllm.settings import _OTHER_ENV  # prefixed variables that are not settings

    fields = {ENV_PREFIX + name.upper() for name in PioFvlmSettings.model_fields}
    table = set(re.findall(rf"^\| `({ENV_PREFIX}[A-Z_]+)`", DOCS["settings.md"], re.M))
    assert table == fields
    for page, text in {"README.md": README, **DOCS}.items():
        named = set(re.findall(rf"`({ENV_PREFIX}[A-Z_]+)`", text))
        assert named <= fields | _OTHER_ENV, (page, named - fields - _OTHER_ENV)


def test_readme_is_a_front_door():
    assert len(README.splitlines()) <= 250
    for heading in ("## Install", "## Models and versions", "## The per-request API", "## Limitations",
                    "## Troubleshooting", "## Results"):
        assert heading in README
    linked = set(re.findall(r"\]\(docs/([\w.-]+\.md)", README))
    assert linked == set(DOCS), set(DOCS) ^ linked


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


@pytest.mark.parametrize("page", ["README.md", "docker/README.md", *(f"docs/{name}" for name in DOCS)])
def test_every_relative_link_and_anchor_resolves(page):
    path = ROOT / page
    text = path.read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        assert resolved.exists(), (page, target)
        if anchor and resolved.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", resolved.read_text(), re.M)
            assert anchor in {_slug(h) for h in headings}, (page, target)


@pytest.mark.parametrize("page", ["README.md", *(f"docs/{name}" for name in DOCS)])
def test_modules_and_scripts_named_in_the_docs_exist(page):
    text = (ROOT / page).read_text()
    for module in set(re.findall(r"python -m ([\w.]+)", text)):
        assert subprocess.run([sys.executable, "-c", f"import importlib.util as u; "
                               f"assert u.find_spec({module!r})"], cwd=ROOT).returncode == 0, module
    for script in set(re.findall(r"bash (scripts/[\w.]+)", text)):
        assert (ROOT / script).exists(), script


def test_the_releases_page_matches_the_gate_the_records_and_ci():
    from pio_fvlm_vllm import SUPPORTED_VLLM, unsupported_vllm
    from pio_fvlm_vllm.vllm_touch_points import TOUCH_POINTS, recorded

    page = DOCS["vllm-releases.md"]
    records = recorded()
    rows = re.findall(r"^\| 0\.1\.0 \| (\d+\.\d+)\.x", page, re.M)
    assert sorted(set(rows)) == sorted({v.rsplit(".", 1)[0] for v in records})
    assert all(unsupported_vllm(v) is None for v in records)
    counts = {v: len(prints) for v, prints in records.items()}
    assert (f"({len(TOUCH_POINTS)} today: {counts['0.32.0']} apply to 0.32 and 0.33, {counts['0.34.0']} to 0.34)"
            in page) and counts["0.32.0"] == counts["0.33.0"]
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'gpu = ["vllm{SUPPORTED_VLLM}"]' in pyproject
    assert "bash scripts/test_releases.sh" in (ROOT / ".ci" / "run").read_text()
    lane = re.search(r"RELEASES=\(([\d. ]+)\)", (ROOT / "scripts" / "test_releases.sh").read_text()).group(1)
    assert set(lane.split()) == set(records) - {"0.32.0"}
    image = re.search(r"^ARG VLLM_VERSION=v(\S+)$", (ROOT / "docker" / "Dockerfile").read_text(), re.M).group(1)
    assert image in records


def test_7b_shape_checkpoint_matches_llava_v16_vicuna_7b(tmp_path):
    subprocess.run([sys.executable, "-m", "pio_fvlm_vllm.checkpoints", "7b-shape", str(tmp_path / "7b")],
                   check=True, cwd=ROOT, capture_output=True)
    config = json.loads((tmp_path / "7b" / "config.json").read_text())
    text, vision = config["text_config"], config["vision_config"]
    assert config["architectures"] == ["LlavaNextForConditionalGeneration"]
    assert (text["hidden_size"], text["num_hidden_layers"], text["intermediate_size"], text["vocab_size"]) == \
        (4096, 32, 11008, 32064)
    assert (vision["hidden_size"], vision["num_hidden_layers"], vision["image_size"], vision["patch_size"]) == \
        (1024, 24, 336, 14)
    assert config["image_token_index"] == 32000
    assert not list((tmp_path / "7b").glob("*.safetensors"))


def test_7b_shape_llava_1_5_checkpoint_matches_llava_1_5_7b_hf(tmp_path):
    subprocess.run([sys.executable, "-m", "pio_fvlm_vllm.checkpoints", "7b-shape-llava-1.5", str(tmp_path / "7b")],
                   check=True, cwd=ROOT, capture_output=True)
    config = json.loads((tmp_path / "7b" / "config.json").read_text())
    processor = json.loads((tmp_path / "7b" / "processor_config.json").read_text())
    text, vision = config["text_config"], config["vision_config"]
    assert (config["architectures"], config["model_type"]) == (["LlavaForConditionalGeneration"], "llava")
    assert "image_grid_pinpoints" not in config
    assert (text["hidden_size"], text["num_hidden_layers"], text["intermediate_size"], text["vocab_size"]) == \
        (4096, 32, 11008, 32064)
    assert (vision["hidden_size"], vision["num_hidden_layers"], vision["image_size"], vision["patch_size"]) == \
        (1024, 24, 336, 14)
    assert (config["image_token_index"], config["vision_feature_layer"]) == (32000, -2)
    assert processor["processor_class"] == "LlavaProcessor"
    assert processor["image_processor"]["image_processor_type"] == "CLIPImageProcessor"
    assert processor["image_processor"]["crop_size"] == {"height": 336, "width": 336}
    assert not list((tmp_path / "7b").glob("*.safetensors"))


def test_7b_shape_qwen2_5_vl_checkpoint_matches_qwen2_5_vl_7b_instruct(tmp_path):
    subprocess.run([sys.executable, "-m", "pio_fvlm_vllm.checkpoints", "7b-shape-qwen2.5-vl", str(tmp_path / "q")],
                   check=True, cwd=ROOT, capture_output=True)
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    vision = config["vision_config"]
    assert (config["architectures"], config["model_type"]) == (["Qwen2_5_VLForConditionalGeneration"], "qwen2_5_vl")
    assert (config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"], config["vocab_size"],
            config["num_attention_heads"], config["num_key_value_heads"]) == (3584, 28, 18944, 152064, 28, 4)
    assert config["rope_scaling"] == {"type": "mrope", "mrope_section": [16, 24, 24]}
    assert (vision["depth"], vision["hidden_size"], vision["out_hidden_size"], vision["fullatt_block_indexes"]) == \
        (32, 1280, 3584, [7, 15, 23, 31])
    assert config["tie_word_embeddings"] is False
    template = json.loads((tmp_path / "q" / "chat_template.json").read_text())["chat_template"]
    assert "<|vision_start|><|image_pad|><|vision_end|>" in template
    tokenizer_config = json.loads((tmp_path / "q" / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "Qwen2Tokenizer" and "chat_template" not in tokenizer_config
    assert not list((tmp_path / "q").glob("*.safetensors"))


def test_tiny_llava_1_5_weights_use_the_published_key_names(tmp_path):
    from safetensors import safe_open

    subprocess.run([sys.executable, "-m", "pio_fvlm_vllm.checkpoints", "tiny-llava-1.5", str(tmp_path / "t")],
                   check=True, cwd=ROOT, capture_output=True)
    with safe_open(str(tmp_path / "t" / "model.safetensors"), "pt") as f:
        prefixes = {k.split(".")[0] + "." + k.split(".")[1] for k in f.keys()}
    assert prefixes == {"language_model.model", "language_model.lm_head", "vision_tower.vision_model",
                        "multi_modal_projector.linear_1", "multi_modal_projector.linear_2"}


@pytest.mark.parametrize("dockerfile", ["docker/Dockerfile", "docker/Dockerfile.cpu"])
def test_dockerfiles_pass_hadolint(dockerfile):
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    result = subprocess.run([hadolint, str(ROOT / dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_gpu_image_pins_what_it_installs():
    text = (ROOT / "docker" / "Dockerfile").read_text()
    assert re.search(r"^ARG VLLM_VERSION=v\d+\.\d+\.\d+$", text, re.M)
    assert re.search(r"^ARG FLASH_ATTN_VERSION=\d+\.\d+\.\d+", text, re.M)
    assert '"flash-attn==${FLASH_ATTN_VERSION}"' in text and "--no-build-isolation" in text


def test_cpu_image_installs_with_the_readme_setup_script():
    text = (ROOT / "docker" / "Dockerfile.cpu").read_text()
    assert "RUN bash scripts/setup_cpu.sh" in text
    assert 'ENTRYPOINT ["/usr/local/bin/pio-fvlm-serve"]' in text


def test_the_cpu_run_line_is_the_one_the_smoke_script_runs():
    """The documented CPU run line gives the shared memory vLLM needs, the image has the compiler
    torch.compile needs, and the committed smoke test runs that very line."""
    readme = (ROOT / "docker" / "README.md").read_text()
    (line,) = re.findall(r"^docker run .*pio-fvlm-vllm:cpu /models/tiny.*$", readme, re.M)
    assert "--shm-size=" in line and "-p 8000:8000" in line
    assert re.search(r"install .*\bg\+\+=", (ROOT / "docker" / "Dockerfile.cpu").read_text())
    smoke = (ROOT / "scripts" / "docker_cpu_smoke.sh").read_text()
    assert "grep -E '^docker run .*pio-fvlm-vllm:cpu /models/tiny' docker/README.md" in smoke


def test_compose_file_builds_the_gpu_image():
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    service = compose["services"]["llava"]
    assert service["build"]["dockerfile"] == "docker/Dockerfile"
    assert service["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def dashboard_metric_names() -> set[str]:
    """Every metric name the Grafana dashboard's queries read (histogram series by base name)."""
    dashboard = json.loads((ROOT / "docker/grafana/dashboards/pio_fvlm.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    names = {n for e in exprs for n in re.findall(r"\b((?:pio_fvlm|vllm:)[a-z_:]+)", e)}
    return {re.sub(r"_bucket$", "", n) for n in names}


def test_every_dashboard_query_follows_the_model_variable():
    dashboard = json.loads((ROOT / "docker/grafana/dashboards/pio_fvlm.json").read_text())
    (variable,) = dashboard["templating"]["list"]
    assert variable["name"] == "model_name" and "label_values(" in variable["definition"]
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            series = re.findall(r"\b(?:pio_fvlm|vllm:)[a-z_:]+(\{[^}]*\})?", target["expr"])
            assert series and all('model_name=~"$model_name"' in labels for labels in series), target["expr"]


def test_compose_wires_prometheus_and_grafana_to_the_server():
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())["services"]
    scrape = yaml.safe_load((ROOT / "docker" / "prometheus.yml").read_text())
    assert scrape["scrape_configs"][0]["static_configs"][0]["targets"] == ["llava:8000"]
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in compose["prometheus"]["volumes"]
    for volume in compose["grafana"]["volumes"] + compose["prometheus"]["volumes"]:
        assert (ROOT / "docker" / volume.split(":")[0]).exists(), volume
    for service in ("prometheus", "grafana"):
        assert re.search(r":v?\d+\.\d+\.\d+$", compose[service]["image"]), compose[service]["image"]
    source = yaml.safe_load((ROOT / "docker/grafana/provisioning/datasources/prometheus.yaml").read_text())
    dashboard = json.loads((ROOT / "docker/grafana/dashboards/pio_fvlm.json").read_text())
    uids = {t["datasource"]["uid"] for panel in dashboard["panels"] for t in panel["targets"]}
    assert uids == {source["datasources"][0]["uid"]}
    assert "pio_fvlm_served_images_total" in dashboard_metric_names()


def test_entrypoint_adds_the_plugin_and_host_flags_only_when_not_given(tmp_path):
    fake = tmp_path / "vllm"
    fake.write_text('#!/usr/bin/env bash\necho "$@"\n')
    fake.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin"}
    run = lambda *a: subprocess.run(["bash", str(ROOT / "docker/entrypoint.sh"), *a], env=env,  # noqa: E731
                                    capture_output=True, text=True, check=True).stdout.split()
    assert run("m") == ["serve", "m", "--plugin", "pio_fvlm", "--host", "0.0.0.0"]
    assert run("m", "--plugin", "pio_fvlm", "--host", "127.0.0.1").count("--plugin") == 1
    # The caller's host wins, in either spelling.
    assert run("m", "--host=127.0.0.1") == ["serve", "m", "--host=127.0.0.1", "--plugin", "pio_fvlm"]
    assert run("m", "--host", "::1", "--plugin=pio_fvlm") == ["serve", "m", "--host", "::1", "--plugin=pio_fvlm"]


def test_demo_command_runs_end_to_end(tmp_path):
    """`python -m pio_fvlm_vllm.demo`, as the README shows it."""
    result = subprocess.run([sys.executable, "-m", "pio_fvlm_vllm.demo", "--checkpoint", str(tmp_path / "tiny")],
                            cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()
            if line.startswith(("all image", "visual_keep="))}
    full = rows["all"]
    pruned = next(v for k, v in rows.items() if k.startswith("visual_keep="))
    kept, total = map(int, pruned[2].split("/"))
    assert full[4] == f"{total}/{total}"
    assert int(pruned[1]) == int(full[3]) - total + kept
