"""A distributed set-up on loopback: Airflow's CeleryExecutor with workers that share no disk.

`make cluster` (`python -m pipeline.cluster up`) starts, under a state folder (default `cluster_home/`, git-ignored)
and on 127.0.0.1 only:

| component | what | state |
| --- | --- | --- |
| PostgreSQL | Airflow's metadata and MLflow's backend store: databases `airflow` and `mlflow`, a role each, passwords | `postgres/` |
| Redis | the Celery broker (password) | `redis/` |
| MLflow server | tracking + registry on PostgreSQL, artifacts proxied by the server | `mlflow-artifacts/` |
| Airflow | API server + UI, scheduler, DAG processor; CeleryExecutor | `airflow/` |
| workers `w1`, `w2` | `airflow celery worker --concurrency 1`, each with its own workspaces | `workers/wN/` |
| DVC remote | where stage outputs travel between workers (a folder; `PIPELINE_DVC_REMOTE` for any DVC URL) | `dvc-remote/` |

A worker builds each DAG run in its own clone of the project at the run's commit (`pipeline.workspace`); stage
outputs travel only through the DVC remote (`dvc repro --pull`, run-cache, `dvc push`), metrics, runs and models
only to the MLflow server. `make cluster-down` stops everything (nothing listens, no process is left; the state
stays for the next `up`), `make cluster-status` shows what runs, `make cluster-pull` brings the latest run's
`dvc.lock`, metrics, plots and models into this working tree (`dvc repro` is then a no-op), and `make
cluster-check` runs the whole pipeline on tiny data through the cluster, SIGKILLs a worker in the middle of a task,
compares the metrics with a one-machine `dvc repro` and writes `metrics/cluster.json`.

Environment: CLUSTER_HOME, CLUSTER_AIRFLOW_PORT (8090), CLUSTER_MLFLOW_PORT (5050), CLUSTER_WORKERS (2),
CLUSTER_GPU_WORKERS (workers that also take the `gpu` queue, e.g. `w1`), PIPELINE_DVC_REMOTE,
CLUSTER_HEARTBEAT_TIMEOUT (seconds before a silent task counts as dead; Airflow's default is 300).
"""
from __future__ import annotations

import argparse
import base64
import glob
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tqdm import tqdm

from pipeline import io

STATE_FILE = "cluster.json"
HOST = "127.0.0.1"
DAG_ID = "transfer_pipeline"


def default_home() -> Path:
    return Path(os.environ.get("CLUSTER_HOME") or Path.cwd() / "cluster_home").resolve()


# ---------------------------------------------------------------------------------------------------- helpers

def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((HOST, port)) == 0


def wait_for(what: str, ready, timeout: float, log: Path | None = None, interval: float = 1.0):
    """Poll `ready()` until it returns something truthy; a clear error (with the log's tail) after `timeout`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if value := ready():
                return value
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(interval)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    raise SystemExit(f"{what} was not ready after {timeout:.0f} s" + (f"; the end of {log}:\n{tail}" if tail else ""))


def http(method: str, url: str, body: dict | None = None, token: str | None = None, timeout: float = 30):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        text = r.read().decode()
    return json.loads(text) if text.strip().startswith(("{", "[")) else text


def load_state(home: Path) -> dict:
    path = home / STATE_FILE
    if not path.exists():
        raise SystemExit(f"no cluster state in {home}: start one with `make cluster` (CLUSTER_HOME={home})")
    return json.loads(path.read_text())


def save_state(state: dict) -> None:
    io.write_text(Path(state["home"]) / STATE_FILE, json.dumps(state, indent=2), mode=0o600)  # it holds passwords


def venv_bin() -> Path:
    return Path(sys.executable).parent


# ---------------------------------------------------------------------------------------------------- system

def pg_bin() -> Path | None:
    if found := shutil.which("initdb"):
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(versions[-1]).parent if versions else None


def ensure_system() -> None:
    """Debian's PostgreSQL and Redis (installed when missing and we are root), and the Python side."""
    missing = [pkg for pkg, ok in (("postgresql", pg_bin()), ("redis-server", shutil.which("redis-server"))) if not ok]
    if missing:
        if os.geteuid() != 0:
            raise SystemExit(f"missing {', '.join(missing)}: install with `sudo apt-get install -y {' '.join(missing)}`")
        print(f"installing {', '.join(missing)} (apt-get)", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env, stdout=subprocess.DEVNULL)
    import importlib.util

    for module in ("airflow.providers.celery", "psycopg2", "redis"):
        if importlib.util.find_spec(module) is None:
            raise SystemExit(f"Python module {module} is missing from {sys.prefix}: run `make setup`")


def as_postgres(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run its tools as the `postgres` user."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def pg_data_dir(home: Path) -> Path:
    """`postgres/` in the state folder; as root, where the `postgres` user cannot reach that folder (a private
    temporary or home directory on the way), a folder of its own under /var/lib/postgresql, named by the state folder."""
    data = home / "postgres"
    if os.geteuid() != 0 or subprocess.run(as_postgres(["test", "-x", str(home)])).returncode == 0:
        return data
    return Path("/var/lib/postgresql") / f"pipeline-cluster-{hashlib.sha256(str(home).encode()).hexdigest()[:12]}"


def pg_url(state: dict, db: str, driver: str = "postgresql") -> str:
    return f"{driver}://{db}:{state['secrets'][db]}@{HOST}:{state['ports']['postgres']}/{db}"


# ---------------------------------------------------------------------------------------------------- processes

def spawn(state: dict, name: str, cmd: list[str], env: dict, cwd: Path | None = None) -> int:
    """Start a component in its own session (its process group is what `down` stops), output to logs/NAME.log."""
    logs = Path(state["home"]) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / f"{name}.log", "ab") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd or state["project"], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    state["pids"][name] = proc.pid
    save_state(state)
    return proc.pid


def alive(pid: int) -> bool:
    import psutil

    try:  # an exited child of ours stays a zombie until reaped: that is not alive
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def tree(pid: int) -> list:
    """The process and all its descendants (psutil.Process objects), those still there."""
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def reap() -> None:
    """Collect exited children of this process (the check runs components as its children)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def stop(procs: list, timeout: float = 40) -> list:
    """SIGTERM each process once, wait, SIGKILL what is left; returns those that would not die."""
    import psutil

    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, left = psutil.wait_procs(procs, timeout=timeout)
    for p in left:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    _, left = psutil.wait_procs(left, timeout=10)
    reap()
    return [p for p in left if alive(p.pid)]


def listening(state: dict) -> list[tuple[str, int]]:
    """Every (address, port) a process of the cluster listens on."""
    import psutil

    pids = {p.pid for pid in state["pids"].values() for p in tree(pid)}
    pids |= {p.pid for p in tree(postmaster_pid(state) or -1)}
    out = set()
    for c in psutil.net_connections(kind="inet"):
        if c.status == psutil.CONN_LISTEN and c.pid in pids:
            out.add((c.laddr.ip, c.laddr.port))
    return sorted(out)


def postmaster_pid(state: dict) -> int | None:
    pidfile = Path(state["pg_data"]) / "postmaster.pid"
    try:
        return int(pidfile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


# ---------------------------------------------------------------------------------------------------- components

def start_postgres(state: dict) -> None:
    data, port = Path(state["pg_data"]), state["ports"]["postgres"]
    binary = pg_bin()
    root = os.geteuid() == 0
    if not (data / "PG_VERSION").exists():
        shutil.rmtree(data, ignore_errors=True)
        data.mkdir(parents=True, mode=0o700)
        pwfile = data.parent / f".{data.name}.pw"
        pwfile.write_text(state["secrets"]["cluster"] + "\n")
        if root:
            shutil.chown(data, "postgres", "postgres")
            shutil.chown(pwfile, "postgres", "postgres")
        try:
            subprocess.run(as_postgres([str(binary / "initdb"), "-D", str(data), "-U", "cluster", f"--pwfile={pwfile}",
                                        "--auth=scram-sha-256", "-E", "UTF8", "--no-locale"]),
                           check=True, stdout=subprocess.DEVNULL)
        finally:
            pwfile.unlink(missing_ok=True)
        # TCP on loopback only; no Unix socket at all (nothing on the file system to reach it by)
        conf = f"\nlisten_addresses = '{HOST}'\nunix_socket_directories = ''\nmax_connections = 200\n"
        subprocess.run(as_postgres(["sh", "-c", f"cat >> {data / 'postgresql.conf'}"]), input=conf.encode(), check=True)
    subprocess.run(as_postgres([str(binary / "pg_ctl"), "-D", str(data), "-l", str(data / "server.log"), "-w", "-t",
                                "60", "-o", f"-p {port}", "start"]), check=True, stdout=subprocess.DEVNULL)
    import psycopg2

    admin = psycopg2.connect(host=HOST, port=port, user="cluster", password=state["secrets"]["cluster"],
                             dbname="postgres")
    admin.autocommit = True
    with admin.cursor() as cur:
        for db in ("airflow", "mlflow"):
            cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (db,))
            if not cur.fetchone():
                cur.execute(f'CREATE ROLE "{db}" LOGIN PASSWORD %s', (state["secrets"][db],))
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,))
            if not cur.fetchone():
                cur.execute(f'CREATE DATABASE "{db}" OWNER "{db}"')
    admin.close()


def start_redis(state: dict) -> None:
    folder = Path(state["home"]) / "redis"
    folder.mkdir(parents=True, exist_ok=True)
    port = state["ports"]["redis"]
    spawn(state, "redis", ["redis-server", "--bind", HOST, "--port", str(port), "--save", "", "--appendonly", "no",
                           "--dir", str(folder), "--requirepass", state["secrets"]["redis"]], dict(os.environ))
    wait_for("Redis", lambda: port_open(port), 30, Path(state["home"]) / "logs" / "redis.log")


def mlflow_uri(state: dict) -> str:
    return f"http://{HOST}:{state['ports']['mlflow']}"


def start_mlflow(state: dict) -> None:
    artifacts = Path(state["home"]) / "mlflow-artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    spawn(state, "mlflow", [str(venv_bin() / "mlflow"), "server", "--backend-store-uri", pg_url(state, "mlflow"),
                            "--artifacts-destination", artifacts.as_uri(), "--serve-artifacts", "--host", HOST,
                            "--port", str(state["ports"]["mlflow"]), "--workers", "1"], dict(os.environ))
    wait_for("MLflow server", lambda: http("GET", f"{mlflow_uri(state)}/health", timeout=5), 240,
             Path(state["home"]) / "logs" / "mlflow.log")


def airflow_url(state: dict) -> str:
    return f"http://{HOST}:{state['ports']['airflow']}"


def airflow_env(state: dict) -> dict:
    """The configuration every Airflow component shares (one JWT secret, one Fernet key, one API URL)."""
    home, s = Path(state["home"]), state["secrets"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    broker = f"redis://:{s['redis']}@{HOST}:{state['ports']['redis']}/0"
    env.update({
        "PATH": f"{venv_bin()}{os.pathsep}{env.get('PATH', '')}",
        "AIRFLOW_HOME": str(home / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(Path(state["project"]) / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW__CORE__PARALLELISM": "8",
        "AIRFLOW__CORE__FERNET_KEY": s["fernet"],
        "AIRFLOW__CORE__HOSTNAME_CALLABLE": "pipeline.workspace.worker_hostname",
        "AIRFLOW__CORE__AUTH_MANAGER":
            "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / "airflow" / "passwords.json"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": pg_url(state, "airflow", "postgresql+psycopg2"),
        "AIRFLOW__CELERY__BROKER_URL": broker,
        "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + pg_url(state, "airflow"),
        "AIRFLOW__CELERY__WORKER_CONCURRENCY": "1",
        "AIRFLOW__API__HOST": HOST,
        "AIRFLOW__API__PORT": str(state["ports"]["airflow"]),
        "AIRFLOW__API__BASE_URL": airflow_url(state),
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__API_AUTH__JWT_SECRET": s["jwt"],
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": str(state["heartbeat_timeout"]),
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL":
            str(max(1, min(10, state["heartbeat_timeout"] // 3))),
        "MLFLOW_TRACKING_URI": mlflow_uri(state),
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "PYTHONUNBUFFERED": "1",
    })
    return env


def worker_env(state: dict, name: str) -> dict:
    """A worker's own workspaces, the repository it clones, the DVC remote and the MLflow server."""
    return {**airflow_env(state), "PIPELINE_WORKER": name,
            "PIPELINE_WORKSPACES": str(Path(state["home"]) / "workers" / name),
            "PIPELINE_REPO": state["project"], "PIPELINE_DVC_REMOTE": state["dvc_remote"]}


def start_airflow(state: dict, gpu_slots: int) -> None:
    env = airflow_env(state)
    home = Path(env["AIRFLOW_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    passwords = home / "passwords.json"
    if not passwords.exists():
        passwords.write_text(json.dumps({"admin": state["secrets"]["admin"]}))
        os.chmod(passwords, 0o600)
    airflow = str(venv_bin() / "airflow")
    subprocess.run([airflow, "db", "migrate"], env=env, check=True, stdout=subprocess.DEVNULL, cwd=state["project"])
    subprocess.run([airflow, "pools", "set", "gpu", str(gpu_slots), "GPU-heavy pipeline stages; slots = GPUs"],
                   env=env, check=True, stdout=subprocess.DEVNULL, cwd=state["project"])
    spawn(state, "api-server", [airflow, "api-server", "--host", HOST, "--port", str(state["ports"]["airflow"])], env)
    spawn(state, "scheduler", [airflow, "scheduler", "--skip-serve-logs"], env)
    spawn(state, "dag-processor", [airflow, "dag-processor"], env)
    gpu_workers = set(filter(None, os.environ.get("CLUSTER_GPU_WORKERS", "").split(",")))
    for name in state["workers"]:
        queues = "default,gpu" if name in gpu_workers else "default"
        spawn(state, f"worker-{name}", [airflow, "celery", "worker", "--celery-hostname", f"{name}@%h",
                                        "--concurrency", "1", "--skip-serve-logs", "--queues", queues],
              worker_env(state, name))


def token(state: dict) -> str:
    return http("POST", f"{airflow_url(state)}/auth/token",
                {"username": "admin", "password": state["secrets"]["admin"]})["access_token"]


def healthy(state: dict) -> bool:
    health = http("GET", f"{airflow_url(state)}/api/v2/monitor/health", timeout=5)
    return all(health.get(c, {}).get("status") == "healthy" for c in ("metadatabase", "scheduler", "dag_processor"))


def workers_ready(state: dict) -> list[str]:
    """The Celery workers that answer a ping (through the broker, as the scheduler reaches them)."""
    proc = subprocess.run([str(venv_bin() / "celery"), "--app",
                           "airflow.providers.celery.executors.celery_executor_utils.app", "inspect", "ping",
                           "--json", "--timeout", "3"], env=airflow_env(state), capture_output=True, text=True,
                          cwd=state["project"])
    line = next((x for x in proc.stdout.splitlines() if x.startswith("{")), "{}")
    return sorted(name.split("@")[0] for name in json.loads(line))


# ---------------------------------------------------------------------------------------------------- up / down

def up(home: Path | None = None, project: Path | None = None, workers: int | None = None,
       heartbeat_timeout: int | None = None) -> dict:
    """Start every component; refuses while a cluster from the same state folder still runs. Returns the state
    (ports, passwords, pids) also kept in `home/cluster.json`."""
    home = (home or default_home()).resolve()
    project = (project or Path.cwd()).resolve()
    ensure_system()
    home.mkdir(parents=True, exist_ok=True)
    old = json.loads((home / STATE_FILE).read_text()) if (home / STATE_FILE).exists() else None
    if old and any(alive(pid) for pid in old["pids"].values()):
        raise SystemExit(f"a cluster is already running from {home}: `make cluster-down` first")
    count = int(workers or os.environ.get("CLUSTER_WORKERS", 2))
    state = {
        "home": str(home), "project": str(project),
        "ports": {"postgres": free_port(), "redis": free_port(),
                  "mlflow": int(os.environ.get("CLUSTER_MLFLOW_PORT", 5050)),
                  "airflow": int(os.environ.get("CLUSTER_AIRFLOW_PORT", 8090))},
        "secrets": (old or {}).get("secrets") or {
            k: secrets.token_urlsafe(18) for k in ("cluster", "airflow", "mlflow", "redis", "admin", "jwt")},
        "pids": {}, "pg_data": str(pg_data_dir(home)),
        "dvc_remote": os.environ.get("PIPELINE_DVC_REMOTE") or str(home / "dvc-remote"),
        "heartbeat_timeout": int(heartbeat_timeout or os.environ.get("CLUSTER_HEARTBEAT_TIMEOUT", 60)),
        "workers": [f"w{i + 1}" for i in range(count)],
    }
    state["secrets"].setdefault("fernet", base64.urlsafe_b64encode(os.urandom(32)).decode())
    for name in ("mlflow", "airflow"):
        if port_open(state["ports"][name]):
            raise SystemExit(f"port {state['ports'][name]} ({name}) is taken: set CLUSTER_{name.upper()}_PORT")
    if "://" not in state["dvc_remote"]:
        Path(state["dvc_remote"]).mkdir(parents=True, exist_ok=True)
    save_state(state)
    sys.path.insert(0, str(project / "dags"))
    try:
        import _common  # the project's own reading of params.yaml (light: yaml + pydantic)
        gpu_slots = _common.schedule(_common.load_params(project))["gpu_slots"]
    finally:
        sys.path.pop(0)
        sys.modules.pop("_common", None)
    steps = [("PostgreSQL", start_postgres), ("Redis", start_redis), ("MLflow server", start_mlflow),
             ("Airflow", lambda s: start_airflow(s, gpu_slots)),
             ("Airflow healthy", lambda s: wait_for("Airflow", lambda: healthy(s), 300,
                                                    home / "logs" / "scheduler.log", 3)),
             ("DAGs parsed", lambda s: wait_for("the transfer_pipeline DAG", lambda: http(
                 "GET", f"{airflow_url(s)}/api/v2/dags/{DAG_ID}", token=token(s)), 300,
                 home / "logs" / "dag-processor.log", 3)),
             ("workers", lambda s: wait_for(f"workers {s['workers']}", lambda: workers_ready(s) == s["workers"],
                                            300, home / "logs" / f"worker-{s['workers'][-1]}.log", 2))]
    try:
        for label, step in tqdm(steps, desc="cluster up", unit="step"):
            tqdm.write(f"starting: {label}")
            step(state)
    except BaseException:
        down(home)
        raise
    print(describe(state))
    return state


def describe(state: dict) -> str:
    return "\n".join([
        f"Airflow UI:   {airflow_url(state)}   user 'admin', password {state['secrets']['admin']}",
        f"MLflow UI:    {mlflow_uri(state)}   (MLFLOW_TRACKING_URI for the workers' stages)",
        f"PostgreSQL:   {HOST}:{state['ports']['postgres']}   databases airflow, mlflow (passwords in "
        f"{Path(state['home']) / STATE_FILE})",
        f"Redis:        {HOST}:{state['ports']['redis']}   (Celery broker)",
        f"DVC remote:   {state['dvc_remote']}",
        f"Workers:      {', '.join(state['workers'])}   workspaces under {Path(state['home']) / 'workers'}",
        f"DAGs from:    {Path(state['project']) / 'dags'}   (workers clone {state['project']} at each run's commit)",
        f"Logs:         {Path(state['home']) / 'logs'}",
    ])


def down(home: Path | None = None) -> dict:
    """Stop every component; returns {"left": pids still alive, "open_ports": ports still accepting}."""
    home = (home or default_home()).resolve()
    state = load_state(home)
    procs = [p for name in reversed(list(state["pids"])) for p in tree(state["pids"][name])]
    left = stop(procs)
    if postmaster_pid(state) is not None and alive(postmaster_pid(state)):
        subprocess.run(as_postgres([str(pg_bin() / "pg_ctl"), "-D", state["pg_data"], "-m", "fast", "-w", "stop"]),
                       stdout=subprocess.DEVNULL)
    state["pids"] = {}
    save_state(state)
    open_ports = [p for p in state["ports"].values() if port_open(p)]
    report = {"left": [p.pid for p in left], "open_ports": open_ports}
    print(f"cluster in {home} stopped" + ("" if not left and not open_ports else f": still there: {report}"))
    return report


def purge(home: Path) -> None:
    """Delete a stopped cluster's state, PostgreSQL's data folder included (it may live outside `home`)."""
    state = load_state(home)
    if any(alive(pid) for pid in state["pids"].values()):
        raise SystemExit(f"the cluster in {home} is running: `make cluster-down` first")
    shutil.rmtree(state["pg_data"], ignore_errors=True)
    shutil.rmtree(home, ignore_errors=True)


def status(home: Path | None = None) -> dict:
    home = (home or default_home()).resolve()
    state = load_state(home)
    rows = {name: alive(pid) for name, pid in state["pids"].items()}
    rows["postgres"] = bool(postmaster_pid(state) and alive(postmaster_pid(state)))
    for name, up_ in rows.items():
        print(f"{name:16s} {'running' if up_ else 'stopped'}")
    if rows and all(rows.values()):
        print(describe(state))
    return rows


# ---------------------------------------------------------------------------------------------------- pull

def pull(remote: str | None = None, workspace: Path | None = None) -> None:
    """Bring a cluster run's results into this working tree: its stages come back from the DVC remote's run-cache
    (`dvc repro --pull`), with their dvc.lock entries, metrics, plots and models; then `dvc repro` has nothing to
    do. Runs of the commit checked out here, with these params, are the ones found."""
    workspace = (workspace or Path.cwd()).resolve()
    remote = remote or os.environ.get("PIPELINE_DVC_REMOTE") or str(default_home() / "dvc-remote")
    env = {**os.environ, "PIPELINE_TRACKING": "off"}  # nothing should run; if something must, it stays local
    subprocess.run(["dvc", "remote", "add", "--local", "--force", "--default", "pipeline", remote], cwd=workspace,
                   check=True, env=env)
    subprocess.run(["dvc", "repro", "--pull"], cwd=workspace, check=True, env=env)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.cluster", description=__doc__.split("\n\n")[0])
    ap.add_argument("--home", type=Path, help="state folder (default: CLUSTER_HOME or ./cluster_home)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("up", help="start PostgreSQL, Redis, MLflow, Airflow (CeleryExecutor) and the workers")
    sub.add_parser("down", help="stop everything (the state stays)")
    sub.add_parser("status", help="what runs, and where")
    sub.add_parser("pull", help="the cluster's results into this working tree")
    args = ap.parse_args(argv)
    if args.cmd == "up":
        up(args.home)
    elif args.cmd == "down":
        report = down(args.home)
        return 1 if report["left"] or report["open_ports"] else 0
    elif args.cmd == "status":
        return 0 if all(status(args.home).values()) else 1
    else:
        pull()
    return 0


if __name__ == "__main__":
    sys.exit(main())
