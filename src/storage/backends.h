#pragma once
// The built-in backends, which open_store knows without registration (store.cpp).

#include <memory>
#include <string>

#include "fastdcp/storage/store.h"

namespace fastdcp::storage {

// The `file` backend over the directory `path`, created first with `options.create` (file_store.cpp).
std::shared_ptr<Store> open_file_store(const std::string& path, const std::string& spec, const OpenOptions& options);
// The in-process store `name`, created on first open (memory_store.cpp).
std::shared_ptr<Store> open_memory_store(const std::string& name, const std::string& spec);

// The errors every backend raises alike: Error(kAlreadyExists) for an if-absent commit that lost,
// Error(kNotFound) for a reader of a missing blob.
[[noreturn]] void throw_blob_exists(const std::string& spec, const std::string& name);
[[noreturn]] void throw_no_blob(const std::string& spec, const std::string& name);

}  // namespace fastdcp::storage
