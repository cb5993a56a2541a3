#pragma once
// Shape and strides with inline room for 6 dimensions, so that building a tensor does not touch
// the heap for ordinary ranks (staging many small tensors must not allocate per tensor).

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <span>

namespace fastdcp {

class Dims {
 public:
  static constexpr size_t kInline = 6;

  Dims() = default;
  Dims(std::initializer_list<int64_t> values) { assign(values.begin(), values.size()); }
  Dims(std::span<const int64_t> values) { assign(values.data(), values.size()); }
  Dims(const Dims& other) { assign(other.data(), other.size()); }
  Dims(Dims&& other) noexcept { *this = std::move(other); }
  // `n` zeros: the offset of a box at a tensor's origin.
  static Dims zeros(size_t n) {
    Dims out;
    out.resize(n);  // zero-initialised
    return out;
  }
  Dims& operator=(const Dims& other) {
    if (this != &other) assign(other.data(), other.size());
    return *this;
  }
  Dims& operator=(Dims&& other) noexcept {
    if (this == &other) return *this;
    heap_ = std::move(other.heap_);
    size_ = other.size_;
    std::copy_n(other.inline_, kInline, inline_);
    other.size_ = 0;
    return *this;
  }

  size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }
  const int64_t* data() const { return heap_ ? heap_.get() : inline_; }
  int64_t* data() { return heap_ ? heap_.get() : inline_; }
  int64_t operator[](size_t i) const { return data()[i]; }
  int64_t& operator[](size_t i) { return data()[i]; }
  const int64_t* begin() const { return data(); }
  const int64_t* end() const { return data() + size_; }
  operator std::span<const int64_t>() const { return {data(), size_}; }

  // Resizes to `n` zero-initialised dimensions.
  void resize(size_t n) {
    heap_.reset();
    if (n > kInline) heap_ = std::make_unique<int64_t[]>(n);
    size_ = n;
    std::fill_n(data(), n, 0);
  }

  friend bool operator==(const Dims& a, const Dims& b) {
    return a.size_ == b.size_ && std::equal(a.begin(), a.end(), b.begin());
  }

 private:
  void assign(const int64_t* values, size_t n) {
    resize(n);
    std::copy_n(values, n, data());
  }

  std::unique_ptr<int64_t[]> heap_;
  int64_t inline_[kInline] = {};
  size_t size_ = 0;
};

}  // namespace fastdcp
