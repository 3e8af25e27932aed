# Sourced by the lent GPU machine's scripts (gpu_session.sh, gpu_paper.sh): `gpu_data DATA_DIR` unpacks
# DATA_DIR/mnist/*-ubyte.gz (gzipped to travel) and DATA_DIR/mnist/partitions/ (the iid split, cached
# where flwr-datasets made it: that machine has none) into a fresh folder, exported as BYZFLOWER_DATA_DIR.
# The caller removes the folder (its EXIT trap).
gpu_data() {
  BYZFLOWER_DATA_DIR=$(mktemp -d)
  export BYZFLOWER_DATA_DIR
  mkdir -p "$BYZFLOWER_DATA_DIR/mnist"
  local f
  for f in "$1"/mnist/*.gz; do
    gunzip -c "$f" >"$BYZFLOWER_DATA_DIR/mnist/$(basename "$f" .gz)" || return 1
  done
  if [ -d "$1/mnist/partitions" ]; then
    cp -r "$1/mnist/partitions" "$BYZFLOWER_DATA_DIR/mnist/"
  fi
}
