// Threads of the engine: its OpenMP loops and the OpenBLAS calls it makes.
#pragma once

namespace lsp {

// Sets both thread counts; throws std::invalid_argument for n < 1.
void set_num_threads(int n);
// Threads of the OpenMP loops.
int num_threads();

}  // namespace lsp
