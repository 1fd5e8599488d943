#!/usr/bin/env bash
# scripts/check-deploy.sh: offline checks of the deployment files (no cluster, no Docker).
#
#   helm/pushgate          helm lint (default values and ci/production-values.yaml), helm template
#                          of those and of a trial variant (in-chart NATS/Redis, NodePort edge),
#                          every rendered manifest validated against the Kubernetes $KUBE_VERSION
#                          schemas, negative tests (bad values must FAIL through
#                          values.schema.json), the rendered pushgate.toml checked against the
#                          Settings structs in crates/
#   deploy/compose.yaml    parses as YAML; services, secrets without defaults, listen addresses,
#                          NATS cluster/JetStream/volumes, Redis appendonly, health checks
#   deploy/pushgate.example.toml   parses; has every setting of every Settings struct, no others
#   deploy/Dockerfile      builder/runtime images, the seven binaries, the BuildKit ignore file
#
# Helm itself comes from the PyPI package helm-python-sdk, which bundles Helm's Go SDK as a shared
# library (helm_python/lib/libhelm_c.so) with a ctypes API: no helm binary. `helm lint` is
# helm_python.lint(chart, values, strict=True, kube_version=...), `helm template` is
# helm_python.Chart.load(chart).render(values, name=..., namespace=..., is_install=True), which
# validates the values against values.schema.json exactly like helm install/template.
# Manifests are validated with the PyPI package kubernetes-validate (bundled JSON schemas).
#
# Both packages are pinned in scripts/python-requirements-deploy.txt and installed into the venv
# ${PUSHGATE_VENV_DIR:-.pushgate/venv} (created with `python3 -m venv` if missing); pip runs
# only when a pinned version is missing, so later runs need no network.
#
# Environment (optional):
#   PUSHGATE_VENV_DIR            venv directory (default .pushgate/venv in the repository)
#   PUSHGATE_CHECK_KUBE_VERSION  Kubernetes version to validate against (default 1.30.0)
#
# Prints one PASS/FAIL line per check and "check-deploy: N passed, N failed" at the end; exits
# non-zero when any check failed or the tools could not be installed.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
REQ="$ROOT/scripts/python-requirements-deploy.txt"
KUBE_VERSION="${PUSHGATE_CHECK_KUBE_VERSION:-1.30.0}"
VENV="${PUSHGATE_VENV_DIR:-$ROOT/.pushgate/venv}"
[[ "$VENV" == /* ]] || VENV="$PWD/$VENV"

step() { printf '\n==> [check-deploy] %s\n' "$*" >&2; }
die() {
    printf '[check-deploy] ERROR: %s\n' "$*" >&2
    printf 'check-deploy: 0 passed, 1 failed\n'
    exit 1
}

# --------------------------------------------------------------------------- tools in the venv
step "Python venv $VENV"
if [[ ! -f "$VENV/pyvenv.cfg" || ! -x "$VENV/bin/python" ]]; then
    if [[ -e "$VENV" && ! -f "$VENV/pyvenv.cfg" ]]; then
        die "$VENV exists and is not a Python venv; move it away or set PUSHGATE_VENV_DIR"
    fi
    command -v python3 >/dev/null 2>&1 || die "python3 is not installed"
    printf '[check-deploy] creating the venv %s\n' "$VENV" >&2
    python3 -m venv "$VENV" || die "python3 -m venv $VENV failed (on Debian: apt-get install python3-venv)"
fi
PY="$VENV/bin/python"
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' ||
    die "$PY is older than Python 3.11 (tomllib is needed)"

# Exit 0 when every NAME==VERSION line of the requirements file is installed at that version.
PINS_OK='
import re, sys
from importlib.metadata import PackageNotFoundError, version
for raw in open(sys.argv[1], encoding="utf-8"):
    line = raw.split("#", 1)[0].strip()
    if not line:
        continue
    m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*(\S+)", line)
    if not m:
        sys.exit(f"not pinned as NAME==VERSION: {line}")
    try:
        if version(m.group(1)) != m.group(2):
            sys.exit(1)
    except PackageNotFoundError:
        sys.exit(1)
'
[[ -f "$REQ" ]] || die "missing $REQ"
if ! "$PY" -c "$PINS_OK" "$REQ" 2>/dev/null; then
    step "pip install -r scripts/python-requirements-deploy.txt"
    "$PY" -m pip install --disable-pip-version-check -q -r "$REQ" ||
        die "pip install -r $REQ failed"
    "$PY" -c "$PINS_OK" "$REQ" || die "installed versions do not match $REQ"
fi

# --------------------------------------------------------------------------- the checks
step "checks (Kubernetes $KUBE_VERSION schemas)"
export CHECK_ROOT="$ROOT" CHECK_KUBE_VERSION="$KUBE_VERSION"
exec "$PY" - <<'PYTHON'
import os
import re
import sys
import tempfile
import tomllib
import traceback

import yaml

ROOT = os.environ["CHECK_ROOT"]
KUBE_VERSION = os.environ["CHECK_KUBE_VERSION"]
CHART = os.path.join(ROOT, "helm", "pushgate")
RELEASE, NAMESPACE = "pushgate", "pushgate"

results = []


def check(name):
    """Runs the decorated function as one check: PASS unless it raises."""

    def wrap(fn):
        try:
            detail = fn()
            results.append(True)
            print(f"PASS  {name}" + (f" ({detail})" if detail else ""), flush=True)
        except Exception as e:  # noqa: BLE001 - every failure is reported the same way
            results.append(False)
            msg = str(e).strip() or repr(e)
            if not isinstance(e, (AssertionError, CheckError)):
                msg = f"{type(e).__name__}: {msg}"
            print(f"FAIL  {name}\n      " + msg.replace("\n", "\n      "), flush=True)
        return fn

    return wrap


class CheckError(Exception):
    pass


try:
    import helm_python as helm
    import kubernetes_validate
    from kubernetes_validate.utils import SchemaNotFoundError
except Exception:
    traceback.print_exc()
    print("check-deploy: 0 passed, 1 failed")
    sys.exit(1)

print(f"      helm-python-sdk {helm.__version__}: Helm SDK {helm.helm_sdk_version()} "
      f"(libhelm_c {helm.helm_c_version()}); kubernetes-validate "
      f"{kubernetes_validate.__version__ if hasattr(kubernetes_validate, '__version__') else ''}",
      flush=True)

# Kinds whose schemas are CRDs, not part of Kubernetes: kubernetes-validate has no schema for
# them, so they are skipped explicitly (and only these: any other kind without a schema fails).
CRD_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),   # Prometheus operator
    ("cert-manager.io/v1", "Certificate"),            # cert-manager
}


def values_file(path):
    with open(path, encoding="utf-8") as f:
        return helm.values_from_yaml(f.read())


def lint(values, label):
    report = helm.lint(CHART, values, strict=True, kube_version=f"v{KUBE_VERSION}",
                       namespace=NAMESPACE)
    problems = [m for m in report.get("messages", []) if m.get("severity", 0) >= 2]
    if report.get("errors") or problems:
        lines = [f"[{m.get('severity')}] {m.get('path')}: {m.get('error', '').strip()}"
                 for m in problems] + [e.strip() for e in report.get("errors") or []]
        raise CheckError(f"helm lint {label}:\n" + "\n".join(lines))
    return f"{report.get('total_charts_linted')} chart, {len(report.get('messages', []))} info"


def render(values):
    with helm.Chart.load(CHART) as chart:
        out = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs = []
    for path, text in sorted(out.items()):
        if not path.endswith((".yaml", ".yml")):
            continue  # NOTES.txt
        for doc in yaml.safe_load_all(text):
            if doc:
                docs.append((path, doc))
    return docs


def validate_manifests(docs):
    failures, skipped, kinds = [], [], {}
    for path, doc in docs:
        kind, api = doc.get("kind"), doc.get("apiVersion")
        name = (doc.get("metadata") or {}).get("name")
        if (api, kind) in CRD_KINDS:
            skipped.append(kind)
            continue
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
            kinds[kind] = kinds.get(kind, 0) + 1
        except kubernetes_validate.ValidationError as e:
            where = ".".join(str(p) for p in e.path)
            failures.append(f"{path}: {kind}/{name}: {where}: {e.message}")
        except SchemaNotFoundError as e:
            failures.append(f"{path}: {kind}/{name}: {e.message}")
    if failures:
        raise CheckError("\n".join(failures))
    summary = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
    if skipped:
        summary += "; CRDs skipped: " + ", ".join(sorted(skipped))
    return summary


def expect_schema_failure(values, must_mention):
    try:
        render(values)
    except helm.HelmValuesError as e:
        msg = str(e)
        if "values don't meet the specifications of the schema" not in msg:
            raise CheckError(f"failed, but not through values.schema.json: {msg}")
        if must_mention not in msg:
            raise CheckError(f"schema error does not mention {must_mention!r}: {msg}")
        return msg.strip().splitlines()[-1].strip()
    raise CheckError("helm template accepted the bad values")


# ---------------------------------------------------------------- Settings structs in crates/
SECTIONS = {
    "CommonSettings": ("common", "crates/runtime/src/config.rs"),
    "TelemetrySettings": ("common.telemetry", "crates/runtime/src/config.rs"),
    "IngressSettings": ("ingress", "crates/ingress-api/src/lib.rs"),
    "RouterSettings": ("router", "crates/router/src/lib.rs"),
    "EdgeSettings": ("edge", "crates/xmpp-edge/src/lib.rs"),
    "BridgeSettings": ("bridge", "crates/native-push-bridge/src/lib.rs"),
    "SmsSettings": ("sms", "crates/sms-fallback/src/lib.rs"),
    "WebhookSettings": ("webhook", "crates/receipt-webhook/src/lib.rs"),
}


def rust_settings():
    """section -> set of field names, read from the Settings structs."""
    fields = {}
    for struct, (section, rel) in SECTIONS.items():
        with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
            src = f.read()
        m = re.search(r"pub struct %s \{(.*?)\n\}" % struct, src, re.S)
        if not m:
            raise CheckError(f"struct {struct} not found in {rel}")
        names = set(re.findall(r"^\s*pub (\w+):", m.group(1), re.M))
        names.discard("telemetry")  # a sub-section
        fields[section] = names
    return fields


def toml_sections(doc):
    out = {}
    for section in SECTIONS.values():
        node = doc
        for part in section[0].split("."):
            node = node.get(part) if isinstance(node, dict) else None
        out[section[0]] = node
    return out


# ================================================================= the chart
DEFAULT = None
PROD = values_file(os.path.join(CHART, "ci", "production-values.yaml"))
TRIAL = {
    "nats": {"internal": {"enabled": True}},
    "redis": {"internal": {"enabled": True}},
    "secrets": {"deviceSecret": "d" * 40, "adminToken": "a" * 30},
    "services": {"xmppEdge": {"service": {"type": "NodePort",
                                          "nodePorts": {"starttls": 30522, "directTls": 30523,
                                                        "websocket": 30543}}},
                 "ingressApi": {"service": {"type": "LoadBalancer"}}},
}

check("helm lint helm/pushgate (default values)")(lambda: lint(DEFAULT, "(default values)"))
check("helm lint helm/pushgate -f ci/production-values.yaml")(
    lambda: lint(PROD, "-f ci/production-values.yaml"))

rendered = {}
for label, values in [("default values", DEFAULT), ("ci/production-values.yaml", PROD),
                      ("trial: in-chart NATS/Redis, NodePort edge", TRIAL)]:
    @check(f"helm template ({label})")
    def _t(values=values, label=label):
        rendered[label] = render(values)
        return f"{len(rendered[label])} manifests"

    if label in rendered:
        check(f"kubernetes-validate {KUBE_VERSION} --strict ({label})")(
            lambda label=label: validate_manifests(rendered[label]))


def find(docs, kind, name_suffix=""):
    for _, d in docs:
        if d["kind"] == kind and d["metadata"]["name"].endswith(name_suffix):
            return d
    raise CheckError(f"no {kind} *{name_suffix} rendered")


@check("chart: production render has HPAs, ServiceMonitor, Certificate, LoadBalancer edge")
def _prod_shape():
    docs = rendered["ci/production-values.yaml"]
    kinds = [d["kind"] for _, d in docs]
    assert kinds.count("HorizontalPodAutoscaler") == 6, "expected 6 HPAs"
    assert kinds.count("ServiceMonitor") == 1 and kinds.count("Certificate") == 1
    assert "Secret" not in kinds, "existingSecret set, yet the chart renders a Secret"
    edge = find(docs, "Service", "-xmpp-edge")
    assert edge["spec"]["type"] == "LoadBalancer"
    assert sorted(p["port"] for p in edge["spec"]["ports"]) == [5222, 5223, 5443]
    api = find(docs, "Service", "-ingress-api")
    assert api["spec"]["type"] == "ClusterIP"
    for _, d in docs:
        if d["kind"] == "Deployment":
            assert "replicas" not in d["spec"], f"{d['metadata']['name']}: replicas set with HPA on"


@check("chart: Deployments (probes, security context, secrets, xmpp-edge rollout)")
def _deployments():
    docs = rendered["default values"]
    deps = {d["metadata"]["name"]: d for _, d in docs if d["kind"] == "Deployment"}
    want = {f"{RELEASE}-{n}" for n in ("ingress-api", "router", "xmpp-edge",
                                       "native-push-bridge", "sms-fallback", "receipt-webhook")}
    assert set(deps) == want, f"Deployments {sorted(deps)} != {sorted(want)}"
    for name, d in deps.items():
        pod = d["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        assert c["command"] == [f"/usr/local/bin/{name[len(RELEASE) + 1:]}"], c["command"]
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "ops"}, name
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "ops"}, name
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"], name
        assert sc["capabilities"]["drop"] == ["ALL"], name
        assert pod["securityContext"]["runAsNonRoot"], name
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert pod.get("topologySpreadConstraints"), f"{name}: no topologySpreadConstraints"
        env = {e["name"]: e for e in c["env"]}
        assert env["PUSHGATE_CONFIG"]["value"] == "/etc/pushgate/pushgate.toml", name
        assert "secretKeyRef" in env["PUSHGATE__COMMON__DEVICE_SECRET"]["valueFrom"], name
        assert ("PUSHGATE__INGRESS__ADMIN_TOKEN" in env) == name.endswith("ingress-api"), \
            f"{name}: admin token must be given to ingress-api only"
    edge = deps[f"{RELEASE}-xmpp-edge"]
    assert edge["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert edge["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 60


@check("chart: rendered pushgate.toml parses and matches the Settings structs in crates/")
def _config():
    fields = rust_settings()
    for label, docs in rendered.items():
        cm = find(docs, "ConfigMap", "-config")
        doc = tomllib.loads(cm["data"]["pushgate.toml"])
        for section, table in toml_sections(doc).items():
            assert isinstance(table, dict), f"{label}: [{section}] missing"
            unknown = set(table) - fields[section] - {"telemetry"}
            assert not unknown, f"{label}: [{section}] has keys the service ignores: {sorted(unknown)}"
            for k, v in table.items():
                if k.endswith("listen") and v:
                    assert v.startswith("0.0.0.0:"), f"{label}: {section}.{k} = {v!r}"
        assert "device_secret" not in doc["common"], "device_secret must not be in the ConfigMap"
        assert "admin_token" not in doc["ingress"], "admin_token must not be in the ConfigMap"
    return f"{len(rendered)} renders"


BAD = [
    ("invalid xmpp-edge service type", "services:\n  xmppEdge:\n    service:\n      type: Ingress\n",
     "/services/xmppEdge/service/type"),
    ("invalid ingress-api service type", "services:\n  ingressApi:\n    service:\n      type: External\n",
     "/services/ingressApi/service/type"),
    ("unknown top-level key", "replicaCount: 3\n", "replicaCount"),
    ("unknown per-service key", "services:\n  router:\n    replica: 3\n", "replica"),
    ("port out of range", "services:\n  router:\n    ports:\n      ops: 70000\n",
     "/services/router/ports/ops"),
    ("comma-separated nats url",
     "nats:\n  external:\n    url: nats://a:4222,nats://b:4222\n", "/nats/external/url"),
    ("namespace with capitals", "config:\n  namespace: Prod\n", "/config/namespace"),
    ("router clock_tick_ms out of range", "services:\n  router:\n    settings:\n      clock_tick_ms: 5\n",
     "clock_tick_ms"),
    ("short device secret", "secrets:\n  deviceSecret: tooshort\n", "/secrets/deviceSecret"),
    ("certManager without issuer and names", "tls:\n  source: certManager\n", "/tls/certManager"),
]
for label, text, mention in BAD:
    @check(f"negative: helm template -f <bad values: {label}> fails through values.schema.json")
    def _bad(text=text, mention=mention):
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            f.write(text)
        try:
            return expect_schema_failure(values_file(f.name), mention)
        finally:
            os.unlink(f.name)


# ================================================================= deploy/
EXAMPLE = os.path.join(ROOT, "deploy", "pushgate.example.toml")


@check("deploy/pushgate.example.toml parses and has every setting of every Settings struct")
def _example():
    with open(EXAMPLE, encoding="utf-8") as f:
        raw = f.read()
    doc = tomllib.loads(raw)
    fields = rust_settings()
    n = 0
    for section, table in toml_sections(doc).items():
        assert isinstance(table, dict), f"[{section}] missing"
        unknown = set(table) - fields[section] - {"telemetry"}
        assert not unknown, f"[{section}] has unknown keys {sorted(unknown)}"
        for k in fields[section]:
            n += 1
            # optional settings are shown commented out ("# key = ...")
            if k not in table and not re.search(r"^#\s*%s\s*=" % re.escape(k), raw, re.M):
                raise CheckError(f"[{section}] {k} is neither set nor shown commented out")
    return f"{len(fields)} sections, {n} settings"


COMPOSE = os.path.join(ROOT, "deploy", "compose.yaml")
PUSHGATE_SERVICES = {
    "ingress-api": "INGRESS", "router": "ROUTER", "xmpp-edge": "EDGE",
    "native-push-bridge": "BRIDGE", "sms-fallback": "SMS", "receipt-webhook": "WEBHOOK",
}


@check("deploy/compose.yaml parses as YAML and lists the expected services")
def _compose():
    with open(COMPOSE, encoding="utf-8") as f:
        doc = yaml.safe_load(f)  # resolves the << merge keys like compose does
    services = doc.get("services") or {}
    want = {"nats-1", "nats-2", "nats-3", "redis", *PUSHGATE_SERVICES}
    assert set(services) == want, f"services {sorted(services)} != {sorted(want)}"
    volumes = set()
    for n in ("nats-1", "nats-2", "nats-3"):
        s = services[n]
        assert str(s["image"]).startswith("nats:2.10"), f"{n}: image {s['image']}"
        args = " ".join(s["command"])
        for flag in ("--jetstream", "--cluster_name=", "--routes=", "--store_dir=",
                     f"--server_name={n}"):
            assert flag in args, f"{n}: {flag} missing"
        assert s.get("healthcheck"), f"{n}: no healthcheck"
        (vol,) = [v.split(":")[0] for v in s["volumes"]]
        volumes.add(vol)
    assert len(volumes) == 3, "each NATS node needs its own volume"
    r = services["redis"]
    assert str(r["image"]).startswith("redis:7") and r.get("healthcheck")
    assert "--appendonly" in r["command"] and "yes" in r["command"], "redis without appendonly"
    for name, section in PUSHGATE_SERVICES.items():
        s = services[name]
        assert s["command"] == [f"/usr/local/bin/{name}"], f"{name}: command {s['command']}"
        env = s["environment"]
        for key in ("NAMESPACE", "NATS_URL", "REDIS_URL", "DEVICE_SECRET"):
            assert f"PUSHGATE__COMMON__{key}" in env, f"{name}: PUSHGATE__COMMON__{key} missing"
        assert str(env["PUSHGATE__COMMON__DEVICE_SECRET"]).startswith("${PUSHGATE_DEVICE_SECRET:?"), \
            f"{name}: the device secret must be required, without a default"
        assert str(env[f"PUSHGATE__{section}__OPS_LISTEN"]).startswith("0.0.0.0:"), \
            f"{name}: ops listener must bind 0.0.0.0"
        for k, v in env.items():
            if k.endswith("LISTEN"):
                assert str(v).startswith("0.0.0.0:"), f"{name}: {k}={v}"
        deps = s.get("depends_on") or {}
        assert all(deps.get(d, {}).get("condition") == "service_healthy"
                   for d in ("nats-1", "nats-2", "nats-3", "redis")), f"{name}: depends_on"
        assert "healthcheck" not in s, f"{name}: the distroless image cannot run a healthcheck"
    admin = services["ingress-api"]["environment"]["PUSHGATE__INGRESS__ADMIN_TOKEN"]
    assert str(admin).startswith("${PUSHGATE_ADMIN_TOKEN:?"), "admin token must be required"
    tls_mounts = [v for v in services["xmpp-edge"]["volumes"] if v.startswith("./tls:")]
    assert tls_mounts, "xmpp-edge: ./tls (deploy/tls) not mounted"
    return f"{len(services)} services"


@check("deploy/Dockerfile: builder, distroless runtime, seven binaries, BuildKit ignore file")
def _dockerfile():
    with open(os.path.join(ROOT, "deploy", "Dockerfile"), encoding="utf-8") as f:
        df = f.read()
    assert "rust:1.95-bookworm" in df, "builder image"
    assert "gcr.io/distroless/cc-debian12:nonroot" in df, "runtime image"
    assert "--release --locked" in df
    for b in ("ingress-api", "router", "xmpp-edge", "native-push-bridge", "sms-fallback",
              "receipt-webhook", "pushgate"):
        assert f"-p {b}" in df, f"-p {b} missing"
    assert re.search(r"^USER 65532", df, re.M), "runtime user"
    with open(os.path.join(ROOT, "deploy", "Dockerfile.dockerignore"), encoding="utf-8") as f:
        ignore = {l.strip() for l in f if l.strip() and not l.startswith("#")}
    for p in ("target/", ".pushgate/", ".git"):
        assert p in ignore, f"Dockerfile.dockerignore does not exclude {p}"
    for line in df.splitlines():
        if re.match(r"^\s*(ENV|ARG)\s", line) and re.search(r"SECRET|TOKEN|PASSWORD", line, re.I):
            raise CheckError(f"secret-looking build setting: {line.strip()}")


passed, failed = results.count(True), results.count(False)
print(f"check-deploy: {passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
PYTHON
