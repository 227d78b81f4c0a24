// csrc/cuda/mlp_backward.cu compiled for the host; diagnostics keep its file and line numbers.
#include "mlp_backward.cu"
