"""The same server as a Ray Serve application: replicas behind Ray's HTTP proxy, autoscaling,
failed replicas replaced. Needs the optional extra: pip install -e '.[cluster]'.

Run (a local Ray instance is started; --address joins a running cluster):
    python -m server.cluster --replicas 2 --artifact artifacts/smollm2-135m-instruct-int8 --port 8000
    python -m server.cluster --min-replicas 1 --max-replicas 4 --target-ongoing 4 --artifact ...
    python -m server.cluster --address auto --replicas 8 --replica-cpus 4 --artifact /shared/artifacts/x
    serve run server.cluster:build_app artifact=artifacts/smollm2-135m-instruct-int8 replicas=2
Every `python -m server` flag means the same here (--threads is per replica, default: the
machine's cores split over the replicas). Each replica loads and verifies the artifacts itself
and reports ready only once they are loaded; `python -m server` never imports Ray.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from .__main__ import build_parser, prepare, to_config
from .config import ServerConfig

log = logging.getLogger("server.cluster")
APP_NAME = "hybrid-llm"


@dataclass
class ClusterConfig:
    replicas: int = 1  # fixed replica count (when min/max are not given)
    min_replicas: int | None = None  # autoscaling on ongoing requests when min or max is given
    max_replicas: int | None = None
    target_ongoing: float = 4.0  # autoscaling: ongoing requests per replica to aim for
    replica_cpus: float | None = None  # Ray CPUs reserved per replica (default: its torch threads)
    address: str | None = None  # an existing Ray cluster ("auto", "ray://..."); None starts a local one
    health_period_s: float = 2.0  # how often Ray asks each replica check_health()
    health_timeout_s: float = 10.0

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None

    def fewest_replicas(self) -> int:
        return (1 if self.min_replicas is None else self.min_replicas) if self.autoscaling else self.replicas

    def most_replicas(self) -> int:
        """The largest replica count: max_replicas, or min_replicas (at least 1) when only that is given."""
        if not self.autoscaling:
            return self.replicas
        return self.max_replicas or max(self.fewest_replicas(), 1)


def max_ongoing(cfg: ServerConfig) -> int:
    """Requests Ray sends one replica at once: everything the replica would accept (its rows and
    its queue) plus room for the ones it turns away, so the 429 with Retry-After comes from our
    scheduler in OpenAI's shape and Ray's own back-pressure (a plain 503) is not the first to act.
    Ray's router sends each request to the less loaded of two replicas it samples, so a 429 means
    both were full (with two replicas: every replica)."""
    return cfg.max_num_seqs + cfg.max_queue + 8


def absolute(cfg: ServerConfig) -> ServerConfig:
    """Paths as the replicas will see them (their working directory is Ray's, not ours); on a
    multi-node cluster the same path must exist on every node."""
    def fix(spec: str | None) -> str | None:
        if spec is None:
            return None
        name, sep, path = spec.partition("=")
        return f"{name}={Path(path).resolve()}" if sep else str(Path(spec).resolve())

    return dataclasses.replace(cfg, artifacts=[fix(s) for s in cfg.artifacts],
                               battery_artifact=fix(cfg.battery_artifact),
                               memory_model=fix(cfg.memory_model))


def options(cfg: ServerConfig, cc: ClusterConfig) -> dict:
    """Ray Serve deployment options: replica count or autoscaling, per-replica request cap and
    CPUs, health-check cadence."""
    opts = {"max_ongoing_requests": max_ongoing(cfg),
            "ray_actor_options": {"num_cpus": cc.replica_cpus or cfg.threads or 1},
            "health_check_period_s": cc.health_period_s, "health_check_timeout_s": cc.health_timeout_s}
    if cc.autoscaling:
        opts["autoscaling_config"] = {"min_replicas": cc.fewest_replicas(), "max_replicas": cc.most_replicas(),
                                      "target_ongoing_requests": cc.target_ongoing}
    else:
        opts["num_replicas"] = cc.replicas
    return opts


def deployment(cfg: ServerConfig, cc: ClusterConfig):
    """The Ray Serve application: one ingress deployment serving create_app's routes."""
    from ray import serve

    from .app import AppState, create_app

    @serve.ingress()
    class Replica:
        async def __init__(self, server_cfg: ServerConfig):
            self.cfg = server_cfg
            self.state = AppState(server_cfg)
            # Load (and verify) here, so Ray counts the replica ready only once it can serve.
            await asyncio.to_thread(self.state.load)
            if self.state.load_error:
                raise RuntimeError(self.state.load_error)  # Ray retries the replica, then fails the deploy

        def __serve_build_asgi_app__(self):
            return create_app(self.cfg, self.state)

        def check_health(self) -> None:
            """Ray replaces a replica whose check raises: a load error or a dead generation worker."""
            if self.state.load_error:
                raise RuntimeError(self.state.load_error)
            if not self.state.serving.scheduler.alive:
                raise RuntimeError("generation worker stopped")

    return serve.deployment(Replica, name="server").options(**options(cfg, cc)).bind(cfg)


def build_app(args: dict[str, str]):
    """Ray Serve's application-builder entry: `serve run server.cluster:build_app artifact=DIR
    replicas=2 threads=1` or a KubeRay RayService's `import_path: server.cluster:build_app` with
    `args:`. Keys are the flags without dashes (max_num_seqs or max-num-seqs), one value each;
    a switch (no_ui) takes "true"."""
    argv: list[str] = []
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        if str(value).lower() == "true":
            argv.append(flag)
        elif str(value).lower() != "false":
            argv += [flag, str(value)]
    a, cfg, cc = parse_args(argv)
    if prepare(a, cfg):
        raise ValueError(f"server.cluster:build_app cannot serve {args} (the error is printed above)")
    return deployment(absolute(cfg), cc)


def run(cfg: ServerConfig, cc: ClusterConfig, blocking: bool = True) -> None:
    """Start (or join) Ray, put Serve's proxy on cfg.host:cfg.port and deploy; blocks until
    interrupted when `blocking`."""
    import ray
    from ray import serve

    if not ray.is_initialized():  # the packages come from `pip install -e` on every node, not a runtime env
        if cc.address:
            ray.init(address=cc.address)
        else:
            ray.init(include_dashboard=False, num_cpus=_local_cpus(cfg, cc))
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(deployment(cfg, cc), name=APP_NAME, route_prefix="/", blocking=blocking)


def _local_cpus(cfg: ServerConfig, cc: ClusterConfig) -> int:
    """A local instance offers at least what the largest replica set reserves, so replicas are
    never left pending on a small machine (they share its cores; the threads split them)."""
    need = cc.most_replicas() * (cc.replica_cpus or cfg.threads or 1)
    return max(os.cpu_count() or 1, int(need + 0.999))


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, ServerConfig, ClusterConfig]:
    p = build_parser("python -m server.cluster", __doc__.splitlines()[0])
    d = ClusterConfig()
    c = p.add_argument_group("Ray Serve")
    c.add_argument("--replicas", type=int, default=d.replicas, help="replicas (fixed count)")
    c.add_argument("--min-replicas", type=int, help="autoscaling: fewest replicas")
    c.add_argument("--max-replicas", type=int, help="autoscaling: most replicas")
    c.add_argument("--target-ongoing", type=float, default=d.target_ongoing,
                   help="autoscaling: ongoing requests per replica to aim for")
    c.add_argument("--replica-cpus", type=float, help="Ray CPUs per replica (default: --threads)")
    c.add_argument("--address", help="join this Ray cluster ('auto' = the local `ray start` head)")
    a = p.parse_args(argv)
    cfg = to_config(a, p)
    if a.replicas < 1:
        p.error("--replicas must be at least 1")
    if a.min_replicas is not None and a.min_replicas < 0 or a.max_replicas is not None and a.max_replicas < 1:
        p.error("--min-replicas must be 0 or more and --max-replicas at least 1")
    if a.min_replicas is not None and a.max_replicas is not None and a.min_replicas > a.max_replicas:
        p.error("--min-replicas is larger than --max-replicas")
    cc = ClusterConfig(replicas=a.replicas, min_replicas=a.min_replicas, max_replicas=a.max_replicas,
                       target_ongoing=a.target_ongoing, replica_cpus=a.replica_cpus, address=a.address)
    if cfg.threads is None and not cc.address:  # split this machine's cores over the replicas
        cfg.threads = max(1, (os.cpu_count() or 1) // cc.most_replicas())
    return a, cfg, cc


def main(argv: list[str] | None = None) -> int:
    a, cfg, cc = parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import ray  # noqa: F401
    except ImportError:
        print("error: Ray Serve is not installed; pip install -e '.[cluster]'", file=sys.stderr)
        return 2
    if rc := prepare(a, cfg):
        return rc
    # SIGTERM (a supervisor, `docker stop`) shuts down like Ctrl-C: the local Ray instance with it
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        run(absolute(cfg), cc)
    except KeyboardInterrupt:
        pass
    finally:
        shutdown()
    return 0


def shutdown() -> None:
    """Remove the application and, for a local instance, stop Ray (a joined cluster keeps running)."""
    import ray
    from ray import serve

    if ray.is_initialized():
        try:
            serve.delete(APP_NAME)
        except Exception as e:  # the cluster may already be gone; stopping must still finish
            log.warning("could not delete the Serve application: %s", e)
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
