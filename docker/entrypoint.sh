#!/usr/bin/env bash
# Entry point of the fly-vllm images: check the speculative config, then
# `vllm serve` with it. The container command is the model and any other
# `vllm serve` options:
#   docker run ... -v "$PWD/fly.json:/etc/fly-vllm/fly.json:ro" fly-vllm:rocm MODEL -tp 8
# FLY_CONFIG: path of the config inside the container (default
# /etc/fly-vllm/fly.json); the literal `none` serves without speculative
# decoding, for an A/B against the same image.
set -euo pipefail

config="${FLY_CONFIG:-/etc/fly-vllm/fly.json}"
examples=/opt/fly-vllm/configs

if [[ $# -eq 0 ]]; then
  echo "fly-vllm: no model given. Usage: docker run [docker options] IMAGE MODEL [vllm serve options]" >&2
  exit 2
fi

if [[ "$config" == none ]]; then
  echo "fly-vllm: FLY_CONFIG=none: serving without speculative decoding" >&2
  exec vllm serve "$@"
fi

if [[ ! -f "$config" ]]; then
  if [[ -d "$config" ]]; then
    echo "fly-vllm: $config is a directory, not a file: Docker mounts a directory" \
      "when the host path given to -v does not exist." >&2
  else
    echo "fly-vllm: speculative config not found: $config" >&2
  fi
  cat >&2 <<EOF
Mount your fly.json there:
  docker run ... -v "\$PWD/fly.json:$config:ro" IMAGE MODEL [vllm serve options]
or use an example bundled in the image (under $examples), e.g.
  docker run ... -e FLY_CONFIG=$examples/fly-ngram.json IMAGE MODEL
or serve without speculative decoding with -e FLY_CONFIG=none.
EOF
  exit 2
fi

echo "fly-vllm: checking $config" >&2
if ! fly-vllm check-config "$config"; then
  echo "fly-vllm: $config is not a valid speculative config (see above); vLLM not started" >&2
  exit 1
fi
exec vllm serve "$@" --speculative-config "$config"
