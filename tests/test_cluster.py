"""cluster/: the autoscaling cluster YAML passes Ray's own validation; the Serve configs build the app;
every shipped cluster runs Ray's token authentication, keeps the dashboard private and needs API keys
on a public proxy."""
import copy
import os
import re
import shlex

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
KEY_VARS = {"TREESPEC_API_KEYS", "TREESPEC_API_KEYS_FILE"}


def _load(name):
    with open(os.path.join(ROOT, "cluster", name)) as f:
        return yaml.safe_load(f)


def _load_all(name) -> list[dict]:
    with open(os.path.join(ROOT, "cluster", name)) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def _rayservice() -> dict:
    (svc,) = [d for d in _load_all("rayservice.yaml") if d["kind"] == "RayService"]
    return svc


def test_cluster_yaml_passes_ray_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _load("cluster.yaml")
    validate_config(config)  # as written
    validate_config(prepare_config(copy.deepcopy(config)))  # as `ray up` sees it, defaults filled in
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}, "no replicas on the head node"
    gpu = [t for t in types.values() if t["node_config"]["InstanceType"].split(".")[0] in ("g5", "p4d")]
    assert gpu and all(t["max_workers"] > t.get("min_workers", 0) for t in gpu), "GPU workers autoscale"
    assert sum(t.get("min_workers", 0) for t in types.values()) <= config["max_workers"]
    assert "/home/ray/treespec" in config["file_mounts"]


def test_cluster_yaml_errors_are_caught():
    import jsonschema
    from ray.autoscaler._private.util import validate_config

    config = _load("cluster.yaml")
    config["available_node_types"]["ray.worker.gpu_1x"]["bogus_field"] = 1
    with pytest.raises(jsonschema.ValidationError):
        validate_config(config)


def _check_serve_config(config: dict) -> None:
    from ray.serve.schema import ServeDeploySchema

    from app.builder import app_builder

    schema = ServeDeploySchema.model_validate(config)
    (application,) = schema.applications
    assert application.import_path == "app:deployment"
    app = app_builder(application.args)  # the args are valid AppConfig arguments and build the application
    server = app._bound_deployment.init_args[0]._bound_deployment
    auto = server._deployment_config.autoscaling_config
    assert auto.max_replicas > auto.min_replicas >= 1
    assert server.ray_actor_options["num_gpus"] == 1


def test_serve_yaml_builds_the_application():
    _check_serve_config(_load("serve.yaml"))


def test_rayservice_embeds_a_serve_config_for_app_deployment():
    import ray

    svc = _rayservice()
    assert svc["apiVersion"] == "ray.io/v1" and svc["kind"] == "RayService"
    serve_config = yaml.safe_load(svc["spec"]["serveConfigV2"])
    _check_serve_config(serve_config)
    assert serve_config["applications"][0]["args"] == _load("serve.yaml")["applications"][0]["args"] | {
        "otlp_endpoint": serve_config["applications"][0]["args"]["otlp_endpoint"]}
    cluster = svc["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["enableInTreeAutoscaling"] is True
    (group,) = cluster["workerGroupSpecs"]
    assert group["maxReplicas"] > group["minReplicas"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"


# ---------------------------------------------------------------------------------------- who reaches what


def _docker_env(config: dict) -> dict:
    """The environment `--env K=V` / `-e K=V` in docker.run_options gives every process of the container."""
    words = shlex.split(" ".join(config.get("docker", {}).get("run_options", [])))
    env = {}
    for flag, value in zip(words, words[1:]):
        if flag in ("--env", "-e") and "=" in value:
            k, v = value.split("=", 1)
            env[k] = v
    return env


def _ray_start_env(config: dict, command: str) -> dict:
    """The environment one start command runs `ray start` with: the container's plus its own exports."""
    env = _docker_env(config)
    for k, v in re.findall(r"(?:export\s+|\b)([A-Z_][A-Z0-9_]*)=(\S+)", command.split("ray start")[0]):
        env[k] = v.rstrip(";")
    return env


def _start_commands(config: dict) -> list[str]:
    return [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray start" in c]


def _flag(command: str, name: str) -> str | None:
    m = re.search(rf"--{name}[= ](\S+)", command)
    return m.group(1) if m else None


def _serve_host(serve_config: dict) -> str:
    from ray.serve.config import HTTPOptions

    return (serve_config.get("http_options") or {}).get("host") or HTTPOptions().host


def test_cluster_yaml_runs_ray_token_auth_with_a_private_dashboard():
    config = _load("cluster.yaml")
    starts = _start_commands(config)
    assert len(starts) == 2, starts
    for command in starts:
        env = _ray_start_env(config, command)
        assert env.get("RAY_AUTH_MODE") == "token", f"ray start without Ray's token authentication: {command}"
        token = env.get("RAY_AUTH_TOKEN_PATH")
        assert token and token in config["file_mounts"], "the token file must reach every node"
        assert "RAY_AUTH_TOKEN" not in env, "the token itself never goes into a config file"
    (head,) = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    assert "--head" in head
    # Ray binds the dashboard to localhost unless told otherwise; told otherwise, it must say localhost.
    assert (_flag(head, "dashboard-host") or "127.0.0.1") in LOCAL_HOSTS, "the dashboard must stay on the head"
    assert "--ray-client-server-port" not in head
    for command in starts:
        assert _flag(command, "dashboard-host") in (None, *LOCAL_HOSTS), command


def test_cluster_yaml_gives_every_node_the_api_keys_of_its_public_proxy():
    config, serve_config = _load("cluster.yaml"), _load("serve.yaml")
    assert _serve_host(serve_config) not in LOCAL_HOSTS  # the proxies face the network: keys are needed
    args = serve_config["applications"][0]["args"]
    assert args.get("require_api_keys") is True, "a public proxy must refuse to start without API keys"
    for command in _start_commands(config):
        env = _ray_start_env(config, command)
        assert KEY_VARS & set(env), f"no API keys in the environment of {command}"
        assert "TREESPEC_API_KEYS" not in env, "keys go in a file on the nodes, not in the cluster config"
        assert env["TREESPEC_API_KEYS_FILE"] in config["file_mounts"]
    # No security group rule of the config opens a Ray port to the world.
    rules = config["provider"].get("security_group", {}).get("IpPermissions", [])
    for rule in rules:
        world = any(r.get("CidrIp") == "0.0.0.0/0" for r in rule.get("IpRanges", []))
        ports = range(rule.get("FromPort", 0), rule.get("ToPort", 65535) + 1)
        assert not (world and any(p in ports for p in (6379, 8265, 8076, 8080, 10001))), rule


def test_rayservice_runs_token_auth_and_keeps_the_dashboard_inside_kubernetes():
    docs = _load_all("rayservice.yaml")
    svc = _rayservice()
    cluster = svc["spec"]["rayClusterConfig"]
    assert cluster.get("authOptions", {}).get("mode") == "token", "the Ray cluster must run token authentication"
    head = cluster["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", "the head Service (dashboard) must stay inside"
    for port in (svc["spec"].get("serveService", {}).get("spec", {}).get("ports") or []):
        assert port.get("port", port.get("targetPort")) != 8265, "the Serve Service must not carry the dashboard"
    groups = [head, *cluster["workerGroupSpecs"]]
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            assert not any("hostPort" in p for p in container.get("ports", [])), container["name"]
    # Nothing else in the file exposes the dashboard: no Ingress, no Service of another type.
    for doc in docs:
        assert doc["kind"] not in ("Ingress", "Route", "Gateway", "HTTPRoute"), doc["kind"]
        if doc["kind"] == "Service":
            ports = {p.get("targetPort", p.get("port")) for p in doc["spec"].get("ports", [])}
            assert 8265 not in ports and "dashboard" not in ports, doc["metadata"]["name"]
    # A NetworkPolicy covers every Ray pod and admits to the dashboard only the cluster and KubeRay's operator.
    (policy,) = [d for d in docs if d["kind"] == "NetworkPolicy"]
    selector = policy["spec"]["podSelector"]["matchLabels"]
    for group in groups:
        labels = group["template"].get("metadata", {}).get("labels", {})
        assert selector.items() <= labels.items(), f"the NetworkPolicy does not cover {group.get('groupName', 'head')}"
    assert "Ingress" in policy["spec"]["policyTypes"]
    for rule in policy["spec"]["ingress"]:
        ports = {p["port"] for p in rule.get("ports", [])}
        if ports and ports <= {8000}:
            continue  # the API: keyed
        peers = rule.get("from")
        assert peers, f"a rule admits anyone to {sorted(ports) or 'every port'}"
        for peer in peers:
            assert "ipBlock" not in peer, peer
            pod = peer.get("podSelector", {}).get("matchLabels", {})
            ours = "namespaceSelector" not in peer and pod.items() >= selector.items()
            operator = pod.get("app.kubernetes.io/name") == "kuberay-operator"
            assert ours or operator, f"{peer} reaches the Ray ports"
            if operator:
                assert ports and ports <= {8265, 52365, 8000}, ports


def test_rayservice_proxy_is_public_only_with_keys_from_a_secret():
    svc = _rayservice()
    serve_config = yaml.safe_load(svc["spec"]["serveConfigV2"])
    assert _serve_host(serve_config) not in LOCAL_HOSTS
    (application,) = serve_config["applications"]
    assert application["args"].get("require_api_keys") is True
    assert not KEY_VARS & set((application.get("runtime_env") or {}).get("env_vars", {})), \
        "runtime_env is stored in the cluster and shown by the dashboard: keys come from the pods' environment"
    cluster = svc["spec"]["rayClusterConfig"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        (container,) = group["template"]["spec"]["containers"]
        env = {e["name"]: e for e in container.get("env") or []}
        keyed = KEY_VARS & set(env)
        assert keyed, f"{container['name']} has no API keys: the ingress may run on any node"
        for name in keyed:
            assert "value" not in env[name], "keys come from a Secret, never from this file"
            assert env[name]["valueFrom"]["secretKeyRef"]["name"]
