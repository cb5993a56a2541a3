#pragma once
// Element types: every dtype the safetensors format names, plus C128 (torch.complex128), which
// safetensors lacks but training states contain.

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>

namespace fastdcp {

// Declared in safetensors' order (increasing alignment), C128 last.
enum class DType : uint8_t {
  kBool,
  kF4,
  kF6_E2M3,
  kF6_E3M2,
  kU8,
  kI8,
  kF8_E5M2,
  kF8_E4M3,
  kF8_E8M0,
  kF8_E4M3FNUZ,
  kF8_E5M2FNUZ,
  kI16,
  kU16,
  kF16,
  kBF16,
  kI32,
  kU32,
  kF32,
  kC64,
  kF64,
  kI64,
  kU64,
  kC128,
};

inline constexpr int kNumDTypes = static_cast<int>(DType::kC128) + 1;

// Bits per element (4 and 6 for the packed sub-byte types).
int dtype_bits(DType dtype) noexcept;
// True for F4/F6_*: such tensors must be contiguous and start on a byte boundary.
inline bool dtype_is_sub_byte(DType dtype) noexcept { return dtype_bits(dtype) % 8 != 0; }
// The safetensors name ("F32", "BF16", ...); "C128" for kC128.
std::string_view dtype_name(DType dtype) noexcept;
std::optional<DType> dtype_from_name(std::string_view name) noexcept;
// Bytes needed by `numel` packed elements.
uint64_t dtype_storage_bytes(DType dtype, uint64_t numel) noexcept;

}  // namespace fastdcp
