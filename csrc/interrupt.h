// Ctrl-C inside the long CPU loops (the angle loss's triplet pass, the photonic kernel's pair walk).
//
// torch releases the GIL while an op runs, so Python's SIGINT handler cannot run before the op returns: a large call
// would ignore Ctrl-C for minutes. The loops poll instead. Thread 0 of the OpenMP team, the thread that called the op,
// calls poll() between pieces of work; at most every 50 ms it takes the GIL and runs Python's pending signal handlers
// (PyErr_CheckSignals, which does nothing off the main thread). Once a handler has raised (KeyboardInterrupt), every
// thread sees stopped() and skips its remaining pieces; after the parallel region the op calls rethrow(), which raises
// that exception in the caller. The op's outputs are its own fresh tensors, freed on the way out: nothing the caller
// holds is left half-written. A call shorter than 50 ms never takes the GIL.
#pragma once

#include <Python.h>
#include <pybind11/pybind11.h>

#include <atomic>
#include <chrono>
#include <memory>

namespace qrkd {

// hidden, as pybind11's types are: it lives inside this extension only
class __attribute__((visibility("hidden"))) Interrupt {
 public:
  // Thread 0 only (or a serial loop). True once a signal handler has raised.
  bool poll() {
    if (stopped()) return true;
    const auto now = std::chrono::steady_clock::now();
    if (now < next_) return false;
    next_ = now + kPeriod;
    if (!Py_IsInitialized()) return false;
    const PyGILState_STATE gil = PyGILState_Ensure();
    if (PyErr_CheckSignals() != 0) {
      error_ = std::make_shared<pybind11::error_already_set>();  // takes the pending exception
      stop_.store(true, std::memory_order_relaxed);
    }
    PyGILState_Release(gil);
    return stopped();
  }

  // Any thread: whether to skip the remaining work.
  bool stopped() const { return stop_.load(std::memory_order_relaxed); }

  // poll() from thread 0, stopped() from the others
  bool check(bool thread_zero) { return thread_zero ? poll() : stopped(); }

  // After the parallel region: raises the exception a signal handler raised, if one did.
  void rethrow() const {
    if (error_) throw *error_;
  }

 private:
  static constexpr std::chrono::milliseconds kPeriod{50};
  std::atomic<bool> stop_{false};
  std::chrono::steady_clock::time_point next_ = std::chrono::steady_clock::now() + kPeriod;
  std::shared_ptr<pybind11::error_already_set> error_;
};

}  // namespace qrkd
