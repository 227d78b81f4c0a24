// csrc/cuda/mlp_forward.cu compiled for the host; diagnostics keep its file and line numbers.
#include "mlp_forward.cu"
