#!/usr/bin/env bash
# A real Kubernetes control plane on loopback, for tests and local use.
#
#   hack/cluster.sh build   build (once, cached by version) every binary the cluster needs
#   hack/cluster.sh up      build if needed, start the cluster, write its kubeconfig
#   hack/cluster.sh env     print `export KUBECONFIG=...` for the running cluster
#   hack/cluster.sh status  exit 0 if the cluster answers, 1 otherwise
#   hack/cluster.sh down    stop every process of the cluster and wait until they are gone
#   hack/cluster.sh restart-apiserver   kill kube-apiserver and start it again (failure tests)
#   hack/cluster.sh compact-etcd        compact etcd's history, forcing watchers to relist
#
# kube-apiserver, kube-controller-manager and kube-scheduler come from the k8s.io/kubernetes
# Go module, etcd from go.etcd.io/etcd/server/v3, kwok/kwokctl and helm from theirs, all at
# the versions pinned in hack/versions.env. kwokctl's binary runtime assembles them; kwok
# provides simulated nodes spread over two datacenters (topology.kubernetes.io/region).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=versions.env
source "$ROOT/hack/versions.env"

CACHE=${CAPSTAN_CACHE:-$ROOT/.cache}
BIN=$CACHE/bin
CLUSTER_NAME=${CAPSTAN_CLUSTER_NAME:-capstan}
export KWOK_WORKDIR=$CACHE/kwok
CLUSTER_DIR=$KWOK_WORKDIR/clusters/$CLUSTER_NAME
KUBECONFIG_OUT=$CACHE/$CLUSTER_NAME.kubeconfig

KUBE_DIR=$BIN/kubernetes-$KUBE_VERSION
ETCD_DIR=$BIN/etcd-$ETCD_VERSION
KWOK_DIR=$BIN/kwok-$KWOK_VERSION
HELM_DIR=$BIN/helm-$HELM_VERSION

log() { printf '[cluster] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# build_into DIR NAME CMD...: runs CMD with $OUT set to a scratch folder, then moves the
# folder into place, so an interrupted build never leaves a half-filled cache entry.
build_into() {
  local dir=$1 name=$2; shift 2
  if [ -d "$dir" ]; then return 0; fi
  log "building $name (first run only; cached in ${dir#"$ROOT"/})"
  local started=$SECONDS
  OUT=$(mktemp -d "$BIN/.tmp.XXXXXX"); chmod 755 "$OUT"
  if ! "$@" >"$OUT.log" 2>&1; then
    tail -n 40 "$OUT.log" >&2
    rm -rf "$OUT" "$OUT.log"
    die "building $name failed"
  fi
  rm -f "$OUT.log"
  mv "$OUT" "$dir"
  log "built $name in $((SECONDS - started))s"
}

build_kubernetes() {
  local minor=${KUBE_VERSION#v1.}; minor=${minor%%.*}
  local date; date=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  local ld="" pkg
  # Kubernetes' own build stamps these; without them the server reports v0.0.0-master,
  # which kubectl cannot parse.
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $pkg.gitVersion=$KUBE_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ld+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$date"
  done
  (cd "$ROOT/hack/go/kubernetes" &&
    CGO_ENABLED=0 go build -trimpath -ldflags "-s -w $ld" -o "$OUT/" \
      k8s.io/kubernetes/cmd/kube-apiserver \
      k8s.io/kubernetes/cmd/kube-controller-manager \
      k8s.io/kubernetes/cmd/kube-scheduler)
}

build_etcd() {
  (cd "$ROOT/hack/go/etcd" &&
    CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$OUT/etcd" go.etcd.io/etcd/server/v3 &&
    CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$OUT/etcdctl" go.etcd.io/etcd/etcdctl/v3)
}

build_kwok() {
  CGO_ENABLED=0 GOBIN=$OUT go install -trimpath -ldflags "-s -w" \
    "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION" "sigs.k8s.io/kwok/cmd/kwokctl@$KWOK_VERSION"
}

build_helm() {
  CGO_ENABLED=0 GOBIN=$OUT go install -trimpath \
    -ldflags "-s -w -X helm.sh/helm/v4/internal/version.version=$HELM_VERSION" \
    "helm.sh/helm/v4/cmd/helm@$HELM_VERSION"
}

cmd_build() {
  command -v go >/dev/null || die "the Go toolchain is needed to build the control plane"
  mkdir -p "$BIN"
  build_into "$ETCD_DIR" "etcd $ETCD_VERSION" build_etcd
  build_into "$KWOK_DIR" "kwok $KWOK_VERSION" build_kwok
  build_into "$HELM_DIR" "helm $HELM_VERSION" build_helm
  build_into "$KUBE_DIR" "kubernetes $KUBE_VERSION" build_kubernetes
}


kubectl_() { kubectl --kubeconfig "$KUBECONFIG_OUT" "$@"; }

# The cluster answers: its kubeconfig exists and the API server is healthy.
cluster_answers() {
  [ -f "$KUBECONFIG_OUT" ] && kubectl_ get --raw /readyz >/dev/null 2>&1
}

# Sends TERM to every pid given and waits until all are gone; what is left after 20 s
# gets KILL.
stop_processes() {
  local pid waited=0
  for pid in "$@"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "$@"; do
    while kill -0 "$pid" 2>/dev/null; do
      if [ $waited -ge 200 ]; then kill -KILL "$pid" 2>/dev/null || true; fi
      sleep 0.1; waited=$((waited + 1))
    done
  done
}

component_pids() {
  local f
  for f in "$CLUSTER_DIR"/pids/*.pid; do
    # kwokctl writes the pid without a trailing newline
    [ -f "$f" ] && echo "$(<"$f")"
  done
  return 0
}

# Prints the last lines of every component's log, for a failed start.
print_logs() {
  local f
  for f in "$CLUSTER_DIR"/logs/*.log; do
    [ -f "$f" ] || continue
    printf '\n--- %s (last 30 lines) ---\n' "${f#"$ROOT"/}" >&2
    tail -n 30 "$f" >&2
  done
}

# Simulated nodes: two datacenters (regions), two zones each. kwok keeps them Ready
# and moves pods bound to them to Running.
nodes_yaml() {
  local i region zone
  for i in 1 2 3 4; do
    region=dc$(( (i + 1) / 2 )); zone=$region-$(( (i + 1) % 2 == 0 ? 1 : 2 ))
    cat <<NODE
---
apiVersion: v1
kind: Node
metadata:
  name: kwok-node-$i
  annotations:
    kwok.x-k8s.io/node: fake
  labels:
    kubernetes.io/hostname: kwok-node-$i
    kubernetes.io/os: linux
    kubernetes.io/arch: amd64
    node.kubernetes.io/instance-type: kwok
    topology.kubernetes.io/region: $region
    topology.kubernetes.io/zone: $zone
    type: kwok
status:
  allocatable: {cpu: "32", memory: 128Gi, pods: "110"}
  capacity: {cpu: "32", memory: 128Gi, pods: "110"}
  nodeInfo: {architecture: amd64, operatingSystem: linux, kubeletVersion: fake, kubeProxyVersion: fake}
NODE
  done
}

cmd_up() {
  cmd_build
  if cluster_answers; then
    log "cluster '$CLUSTER_NAME' is already running"
    cmd_env
    return 0
  fi
  # A cluster folder with no live API server is left from a crash: clear it first.
  [ -d "$CLUSTER_DIR" ] && cmd_down
  mkdir -p "$CACHE"
  log "starting cluster '$CLUSTER_NAME' (Kubernetes $KUBE_VERSION, etcd $ETCD_VERSION, kwok $KWOK_VERSION)"
  local started=$SECONDS
  # CAPSTAN_CLUSTER_UNTHROTTLED=1: the components without their client rate limits.
  # hack/bench-jobs.sh asks for it: kube-controller-manager's default (20 requests/s)
  # creates a few pods a second, which would bound thousands of pods on either path.
  local unthrottled=()
  [ "${CAPSTAN_CLUSTER_UNTHROTTLED:-}" = 1 ] && unthrottled=(--disable-qps-limits)
  # Every component listens on loopback only (hack/kwokctl.yaml); RBAC (Node,RBAC
  # authorization) and the default admission plugins are on, as on a real cluster.
  if ! "$KWOK_DIR/kwokctl" -c "$ROOT/hack/kwokctl.yaml" create cluster --name "$CLUSTER_NAME" --runtime binary "${unthrottled[@]}" \
      --kube-apiserver-binary "$KUBE_DIR/kube-apiserver" \
      --kube-controller-manager-binary "$KUBE_DIR/kube-controller-manager" \
      --kube-scheduler-binary "$KUBE_DIR/kube-scheduler" \
      --etcd-binary "$ETCD_DIR/etcd" \
      --kwok-controller-binary "$KWOK_DIR/kwok" \
      --kube-authorization --kube-admission \
      --kubeconfig "$KUBECONFIG_OUT" \
      --wait 120s >"$CACHE/kwokctl-create.log" 2>&1; then
    cat "$CACHE/kwokctl-create.log" >&2
    print_logs
    die "the cluster did not start"
  fi
  if ! nodes_yaml | kubectl_ apply -f - >/dev/null ||
     ! kubectl_ wait --for=condition=Ready node --all --timeout=60s >/dev/null; then
    print_logs
    die "the simulated nodes did not become Ready"
  fi
  log "cluster '$CLUSTER_NAME' is up in $((SECONDS - started))s with 4 nodes in 2 regions (dc1, dc2)"
  cmd_env
}

cmd_env() {
  [ -f "$KUBECONFIG_OUT" ] || die "no cluster: run $0 up"
  echo "export KUBECONFIG=$KUBECONFIG_OUT"
  log "use it with: eval \"\$($0 env)\"; kubectl get nodes -L topology.kubernetes.io/region"
}

cmd_status() {
  cluster_answers
}

cmd_down() {
  local pids
  # The recorded pids, and any process still running a binary of this cluster's (one
  # started by hand, or left by an interrupted restart).
  pids="$(component_pids) $(pgrep -f "^$CLUSTER_DIR/bin/" || true)"
  if [ -d "$CLUSTER_DIR" ]; then
    "$KWOK_DIR/kwokctl" delete cluster --name "$CLUSTER_NAME" >"$CACHE/kwokctl-delete.log" 2>&1 ||
      log "kwokctl delete cluster failed (see ${CACHE#"$ROOT"/}/kwokctl-delete.log); stopping the processes directly"
  fi
  # kwokctl returns before its processes have exited: wait for each by its own pid.
  # shellcheck disable=SC2086 # a list of pids
  stop_processes $pids
  rm -rf "$CLUSTER_DIR" "$KUBECONFIG_OUT"
  # `down` promises that nothing of the cluster is left running: check it.
  local left
  left=$(pgrep -f "^$CLUSTER_DIR/bin/" || true)
  [ -z "$left" ] || die "processes of cluster '$CLUSTER_NAME' survived down: $left"
  log "cluster '$CLUSTER_NAME' is down"
}

# Starts a component again with the command line and working folder it had, logging
# where kwokctl logs it, and records its new pid where `down` will find it.
relaunch() {
  local name=$1 cwd=$2; shift 2
  # setsid may fork, so the process writes its own pid before it becomes the component.
  # Nothing of ours stays attached to the caller's stdout, or a caller that reads it
  # (a test capturing output) would wait for the component to exit.
  (cd "$cwd" && exec setsid sh -c 'echo $$ >"$0"; exec "$@"' "$CLUSTER_DIR/pids/$name.pid" "$@") \
    >>"$CLUSTER_DIR/logs/$name.log" 2>&1 </dev/null &
}

# Kills kube-apiserver and starts it again with the same command line, as a crash and
# restart of the control plane would; CAPSTAN_APISERVER_DOWNTIME=<s> keeps it down that
# long first. The failure tests (K2, M11) use it. The controller-manager and scheduler
# are started again once it is back, as kubelet restarts a control plane's static pods:
# left alone, their informers took from 20 s to over a minute to resume watching
# (client-go's backoff), and until then new namespaces got no default ServiceAccount, so
# every pod created in them was refused (stop 9's CI failure).
cmd_restart_apiserver() {
  local started=$SECONDS name pid
  [ -f "$CLUSTER_DIR/pids/kube-apiserver.pid" ] || die "no cluster: run $0 up"
  declare -A cmdlines=() cwds=()
  for name in kube-apiserver kube-controller-manager kube-scheduler kwok-controller; do
    pid=$(<"$CLUSTER_DIR/pids/$name.pid")
    cmdlines[$name]=$(tr '\0' '\n' <"/proc/$pid/cmdline") || die "$name (pid $pid) is not running"
    cwds[$name]=$(readlink "/proc/$pid/cwd")
  done
  local -a args=()
  pid=$(<"$CLUSTER_DIR/pids/kube-apiserver.pid")
  kill -KILL "$pid"
  while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
  # An outage of a chosen length (the mesh's "API server down" scenario, M11).
  sleep "${CAPSTAN_APISERVER_DOWNTIME:-0}"
  mapfile -t args <<<"${cmdlines[kube-apiserver]}"
  relaunch kube-apiserver "${cwds[kube-apiserver]}" "${args[@]}"
  until kubectl_ get --raw /readyz >/dev/null 2>&1; do
    if [ $((SECONDS - started)) -gt 60 ]; then
      print_logs
      die "kube-apiserver did not come back"
    fi
    sleep 0.2
  done
  for name in kube-controller-manager kube-scheduler kwok-controller; do
    pid=$(<"$CLUSTER_DIR/pids/$name.pid")
    # kwok is left running when it survived: it holds the simulated nodes' leases, and a
    # new kwok would leave their pods Pending until those leases expired.
    if [ "$name" = kwok-controller ] && kill -0 "$pid" 2>/dev/null; then continue; fi
    stop_processes "$pid"
    mapfile -t args <<<"${cmdlines[$name]}"
    relaunch "$name" "${cwds[$name]}" "${args[@]}"
  done
  controllers_work
  log "kube-apiserver restarted in $((SECONDS - started))s; the controllers work again"
}

# Returns once the controllers act on new objects again: a new namespace gets its default
# ServiceAccount (kube-controller-manager; the ServiceAccount admission plugin refuses
# every pod until that account exists), and a pod in it is scheduled and Running
# (kube-scheduler, kwok). A test after a restart never meets a half-recovered cluster.
# Fails, with the last refusal, if that takes more than 60 s.
controllers_work() {
  local started=$SECONDS probe refused=""
  probe=cluster-probe-$RANDOM$RANDOM
  kubectl_ create namespace "$probe" >/dev/null || die "could not create namespace $probe"
  until kubectl_ get serviceaccount default -n "$probe" >/dev/null 2>&1 &&
        { kubectl_ get pod probe -n "$probe" >/dev/null 2>&1 ||
          refused=$(kubectl_ run probe -n "$probe" --image=probe --restart=Never 2>&1 >/dev/null); } &&
        [ "$(kubectl_ get pod probe -n "$probe" -o jsonpath='{.status.phase}' 2>/dev/null)" = Running ]; do
    if [ $((SECONDS - started)) -gt 60 ]; then
      kubectl_ delete namespace "$probe" --wait=false >/dev/null 2>&1 || true
      print_logs
      die "the controllers do not work after the restart${refused:+ (last refusal: $refused)}"
    fi
    sleep 0.2
  done
  kubectl_ delete namespace "$probe" --wait=false >/dev/null 2>&1 || true
}

# Compacts etcd's history up to now, so every watch older than this moment must relist
# (the API server answers 410 Gone): what a long partition or a slow client meets.
cmd_compact_etcd() {
  local pid arg etcd="" revision
  pid=$(<"$CLUSTER_DIR/pids/kube-apiserver.pid") || die "no cluster: run $0 up"
  while IFS= read -r -d '' arg; do
    case $arg in --etcd-servers=*) etcd=${arg#--etcd-servers=} ;; esac
  done <"/proc/$pid/cmdline"
  [ -n "$etcd" ] || die "could not find etcd's address"
  revision=$("$ETCD_DIR/etcdctl" --endpoints "$etcd" get / --prefix --keys-only --limit 1 -w json |
    grep -o '"revision":[0-9]*' | head -n 1 | cut -d: -f2)
  [ -n "$revision" ] || die "could not read etcd's revision"
  "$ETCD_DIR/etcdctl" --endpoints "$etcd" compact "$revision" >/dev/null
  log "compacted etcd at revision $revision"
}

case "${1:-}" in
  build) cmd_build ;;
  up) cmd_up ;;
  env) cmd_env ;;
  status) cmd_status ;;
  down) cmd_down ;;
  restart-apiserver) cmd_restart_apiserver ;;
  compact-etcd) cmd_compact_etcd ;;
  *) echo "usage: $0 build|up|env|status|down|restart-apiserver|compact-etcd" >&2; exit 2 ;;
esac
