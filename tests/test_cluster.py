"""cluster/: the autoscaling cluster YAML passes Ray's own validation; the Serve configs build the app."""
import copy
import os

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    with open(os.path.join(ROOT, "cluster", name)) as f:
        return yaml.safe_load(f)


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

    svc = _load("rayservice.yaml")
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
