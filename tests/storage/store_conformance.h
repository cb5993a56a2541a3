#pragma once
// The conformance suite every store backend runs (test_store_conformance.cpp): a backend's test
// file instantiates StoreConformance with a StoreBackend that makes fresh, empty stores.

#include <gtest/gtest.h>

#include <functional>
#include <memory>
#include <ostream>
#include <string>

namespace fastdcp::testing {

// Where one test's store lives: its spec, and whatever keeps it (a temporary directory) until
// the test ends.
struct StoreHome {
  virtual ~StoreHome() = default;
  std::string spec;
};

struct StoreBackend {
  std::string name;                                // the instantiation's name: "file", "mem"
  std::function<std::unique_ptr<StoreHome>()> make;  // a fresh, empty store
};

inline void PrintTo(const StoreBackend& backend, std::ostream* os) { *os << backend.name; }

class StoreConformance : public ::testing::TestWithParam<StoreBackend> {};

}  // namespace fastdcp::testing
