"""deploy/jenkins: npm-groovy-lint on the Jenkinsfile, its structure read from the text (so a lint-clean but incomplete
pipeline fails), and the pipeline's Python helpers against the real outputs they read."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys

import pytest

from .deploy_tools import ROOT, run_tool

JENKINS = ROOT / "deploy" / "jenkins"
JENKINSFILE = JENKINS / "Jenkinsfile"
HELPERS = JENKINS / "pipeline_helpers.py"


def text() -> str:
    """The Jenkinsfile without // comments (so a commented-out step does not count)."""
    return re.sub(r"^\s*//.*$|\s+//.*$", "", JENKINSFILE.read_text(encoding="utf-8"), flags=re.M)


def block(source: str, header: str, start: int = 0) -> str:
    """The body of the first ``header { ... }`` at or after ``start`` (braces matched, strings not special-cased:
    the Jenkinsfile's strings hold no unbalanced braces)."""
    match = re.compile(re.escape(header) + r"\s*\{").search(source, start)
    assert match, f"no '{header} {{' block"
    depth, i = 1, match.end()
    while depth:
        depth += {"{": 1, "}": -1}.get(source[i], 0)
        i += 1
    return source[match.end():i - 1]


def stage(name: str) -> str:
    return block(text(), f"stage('{name}')")


# --- lint --------------------------------------------------------------------------------------------------------

def test_npm_groovy_lint():
    proc = run_tool("npm-groovy-lint", "--noserver", "--failon", "warning", "--output", "json",
                    "--config", str(JENKINS / ".groovylintrc.json"), str(JENKINSFILE), timeout=240)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    report = json.loads(proc.stdout[proc.stdout.index("{"):])
    summary = report["summary"]
    assert summary["totalFilesLinted"] == 1, output
    found = {k: summary[k] for k in ("totalFoundErrorNumber", "totalFoundWarningNumber", "totalFoundInfoNumber")}
    assert found == dict.fromkeys(found, 0), json.dumps(report["files"], indent=1)


def test_lint_config_only_relaxes_the_nesting_depth():
    """The one rule changed: the GPU lock wraps two nested stages (pipeline > stages > stage > stages > stage >
    steps), a depth of 6 that the declarative syntax imposes."""
    config = json.loads((JENKINS / ".groovylintrc.json").read_text(encoding="utf-8"))
    assert config == {"extends": "recommended-jenkinsfile",
                      "rules": {"NestedBlockDepth": {"maxNestedBlockDepth": 6}}}


# --- structure ---------------------------------------------------------------------------------------------------

def test_stages_in_order():
    names = re.findall(r"stage\('([^']+)'\)", text())
    assert names == ["Checkout", "Set up", "Validate", "GPU", "Pre-flight", "Train", "Plot"]  # archiving is in post { always }


def test_agent_parameters_and_options():
    source = text()
    assert re.search(r"^pipeline \{\s*agent \{ label 'gpu' \}", source, re.M)
    params = block(source, "parameters")
    config = re.search(r"string\(name: 'CONFIG', defaultValue: '([^']+)'", params)
    assert config and (ROOT / config.group(1)).is_file(), "CONFIG's default must be a config in the repository"
    assert "string(name: 'NOTIFY'" in params
    assert "booleanParam(name: 'RESUME'" in params and "booleanParam(name: 'FORCE'" in params
    options = block(source, "options")
    assert re.search(r"buildDiscarder\(logRotator\(numToKeepStr: '\d+'", options)
    assert re.search(r"timeout\(time: \d+, unit: 'HOURS'\)", options)
    assert "timestamps()" in options and "disableConcurrentBuilds()" in options


def test_one_training_per_gpu_node():
    gpu = stage("GPU")
    assert 'lock(resource: "gpu-${env.NODE_NAME}")' in block(gpu, "options")
    inner = block(gpu, "stages")  # both stages that use the GPU hold the lock
    assert "stage('Pre-flight')" in inner and "stage('Train')" in inner


def test_commands():
    set_up = stage("Set up")
    assert "--require-hashes --no-deps -r deploy/docker/requirements.lock" in set_up  # the image's exact deps
    # no build isolation: it would fetch an unpinned, unhashed setuptools (the lock holds the build backend)
    assert "pip\" install -q --no-deps --no-build-isolation ." in set_up
    validate = stage("Validate")
    assert 'lora-scripts" check --config "$CONFIG" --json > check.json' in validate
    assert "archiveArtifacts artifacts: 'check.json'" in validate and "always" in validate
    assert '"$HELPERS" output-dir "$CONFIG"' in validate and "env.OUTPUT_DIR" in validate
    preflight = stage("Pre-flight")
    assert 'lora-scripts" estimate --config "$CONFIG" > estimate.txt' in preflight
    assert '"$HELPERS" fits estimate.txt' in preflight
    train = stage("Train")
    assert 'lora-scripts" train --config "$CONFIG"' in train and "(--resume latest)" in train
    assert "set -euo pipefail" in train and "tee train.log" in train  # the trainer's exit code is not lost


def test_archive_always_and_plot():
    """The outputs, train.log and loss.csv are archived whatever the result: failed and aborted builds too."""
    post = block(text(), "post", text().index("stage('Plot')"))
    archive = block(post, "always")
    for pattern in ("/*.safetensors", "/diffusers/**", "/adapter/**", "/logs/loss.csv", "'train.log'"):
        assert pattern in archive, pattern
    assert "${env.OUTPUT_DIR}/" in archive and "archiveArtifacts(" in archive and "allowEmptyArchive: true" in archive
    plot = stage("Plot")
    assert '"$OUTPUT_DIR/logs/loss.csv" loss-summary.csv' in plot
    assert re.search(r"plot\(csvFileName: '[^']+\.csv',\s*csvSeries: \[\[file: 'loss-summary.csv'", plot)
    assert "exclusionValues: 'final_loss,min_loss'" in plot


def test_mail_on_success_failure_and_abort():
    post = block(text(), "post", text().index("stage('Plot')"))
    for condition in ("success", "failure", "aborted"):
        body = block(post, condition)
        assert "mail(to: params.NOTIFY" in body and "subject:" in body and "body:" in body, condition


# --- helpers -----------------------------------------------------------------------------------------------------

def helper(*args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(HELPERS), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def test_output_dir_is_read_from_the_config(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("train_data_dir: data\nbase_model: m\noutput_dir: ./output/my_lora\n", encoding="utf-8")
    proc = helper("output-dir", str(config), cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == "output/my_lora", proc.stderr
    config.write_text("train_data_dir: data\nbase_model: m\noutput_dir: /elsewhere/out\n", encoding="utf-8")
    proc = helper("output-dir", str(config), cwd=tmp_path)
    assert proc.returncode == 2 and "outside the workspace" in proc.stderr


def test_fits_reads_the_estimate_output(tmp_path):
    from lora_scripts.preflight import GiB, MemoryEstimate

    parts = {"frozen weights": 6 * GiB, "activations": 3 * GiB}
    cases = [(MemoryEstimate(4, parts, capacity=20 * GiB), 0), (MemoryEstimate(4, parts, capacity=8 * GiB), 1),
             (MemoryEstimate(4, parts), 2), (MemoryEstimate(1, {"x": 300 * 2**20}, capacity=200 * 2**20), 1),
             # a GPU plan also prints system memory: its totals must not be read as the GPU's
             (MemoryEstimate(4, parts, {"swapped blocks (9)": 40 * GiB}, capacity=20 * GiB, ram=64 * GiB,
                             on_gpu=True), 0)]
    for i, (estimate, code) in enumerate(cases):
        path = tmp_path / f"estimate-{i}.txt"
        path.write_text(estimate.render() + "\n", encoding="utf-8")  # what `lora-scripts estimate` prints
        proc = helper("fits", str(path))
        assert proc.returncode == code, (estimate.render(), proc.stdout, proc.stderr)


def test_loss_summary_for_the_plot(tmp_path):
    from lora_scripts.train.logs import CSV_COLUMNS

    loss_csv = tmp_path / "loss.csv"
    with open(loss_csv, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_COLUMNS)
        for step, loss in ((1, 0.9), (2, 0.4), (3, 0.5)):
            writer.writerow([step, 0, loss, 1e-4, step * 1.5, ""][:len(CSV_COLUMNS)])
    out = tmp_path / "summary.csv"
    assert helper("loss-summary", str(loss_csv), str(out)).returncode == 0
    assert list(csv.DictReader(out.open())) == [{"final_loss": "0.5", "min_loss": "0.4", "steps": "3"}]


@pytest.mark.parametrize("args", [[], ["nope"], ["fits"]])
def test_helpers_usage(args):
    proc = helper(*args)
    assert proc.returncode == 2 and "pipeline_helpers.py" in proc.stderr
