// The Python module torchjac._C. Importing it runs the op registrations of
// csrc/ops.cpp (and the CUDA glue); it has one function of its own, the chunk
// runner of the pure-PyTorch CPU path.
//
// parallel_chunks(fn, n, dynamic) calls fn(i, worker) once for each i in
// range(n) on ATen's intra-op threads. With dynamic=True each worker takes the
// next chunk as it finishes one; with dynamic=False worker w takes chunks w,
// w + workers, ... in order, so sums kept per worker add up the same way on
// every run (for torch.use_deterministic_algorithms).
//
// Inside that one parallel region the torch ops of fn run single-threaded
// (ATen and MKL do not nest), so a chunk never waits on a barrier for a thread
// the OS has descheduled: a busy core slows its worker only, and the other
// workers take more chunks. The many small parallel regions of a plain loop of
// torch ops spin at every barrier instead. fn runs under the GIL, which every
// torch op releases while it computes, so workers overlap in the ops.
#include <Python.h>

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <atomic>
#include <cstdint>

#if defined(__SSE__) || defined(_M_X64)
#include <xmmintrin.h>
#define TORCHJAC_HAS_MXCSR 1
#endif

namespace {

// Flush-to-zero and denormals-are-zero on this thread while alive; the previous mode comes back after.
class SubnormalsFlushed {
 public:
#ifdef TORCHJAC_HAS_MXCSR
  SubnormalsFlushed() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | kFlushToZero | kDenormalsAreZero); }
  ~SubnormalsFlushed() { _mm_setcsr(saved_); }

 private:
  static constexpr unsigned kFlushToZero = 0x8000, kDenormalsAreZero = 0x0040;
  unsigned saved_;
#endif
};

struct PythonError {
  PyObject* type = nullptr;
  PyObject* value = nullptr;
  PyObject* traceback = nullptr;
};

PyObject* parallel_chunks(PyObject*, PyObject* args) {
  PyObject* fn = nullptr;
  long long n = 0;
  int dynamic = 1;
  if (!PyArg_ParseTuple(args, "OL|p:parallel_chunks", &fn, &n, &dynamic)) return nullptr;
  if (!PyCallable_Check(fn)) {
    PyErr_SetString(PyExc_TypeError, "parallel_chunks: fn expected a callable fn(chunk, worker)");
    return nullptr;
  }
  std::atomic<long long> next{0};
  std::atomic<bool> failed{false};
  PythonError error;
  // The caller's dispatch state (grad mode, the dispatch keys excluded below autograd, ...) holds in
  // every worker, as it would in the calling thread.
  if (n == 1) {  // one chunk: on this thread, whose torch ops then use every intra-op thread
    SubnormalsFlushed flushed;
    PyObject* result = PyObject_CallFunction(fn, "LL", 0LL, 0LL);
    Py_XDECREF(result);
    return result == nullptr ? nullptr : (Py_INCREF(Py_None), Py_None);
  }
  const long long workers = at::get_num_threads();
  const at::ThreadLocalState caller_state;
  Py_BEGIN_ALLOW_THREADS
  at::parallel_for(0, workers, 1, [&](int64_t first_worker, int64_t end_worker) {
    at::ThreadLocalStateGuard state_guard(caller_state);
    SubnormalsFlushed flushed;
    const PyGILState_STATE gil = PyGILState_Ensure();
    for (int64_t worker = first_worker; worker < end_worker; ++worker) {
      long long static_next = worker;
      for (long long i; !failed.load() && (i = dynamic ? next.fetch_add(1) : static_next) < n;
           static_next += workers) {
        PyObject* result = PyObject_CallFunction(fn, "LL", i, static_cast<long long>(worker));
        if (result != nullptr) {
          Py_DECREF(result);
        } else if (!failed.exchange(true)) {
          PyErr_Fetch(&error.type, &error.value, &error.traceback);
        } else {
          PyErr_Clear();  // a second failure: the first one is reported
        }
      }
    }
    PyGILState_Release(gil);
  });
  Py_END_ALLOW_THREADS
  if (failed.load()) {
    PyErr_Restore(error.type, error.value, error.traceback);
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyObject* max_workers(PyObject*, PyObject*) { return PyLong_FromLong(at::get_num_threads()); }

PyMethodDef methods[] = {
    {"parallel_chunks", parallel_chunks, METH_VARARGS,
     "parallel_chunks(fn, n, dynamic=True): fn(i, worker) for i in range(n) on the intra-op threads; "
     "worker < max_workers()"},
    {"max_workers", max_workers, METH_NOARGS, "The number of workers parallel_chunks may use."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
