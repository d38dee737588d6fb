// Read-only access to model files, and a bounds-checked little-endian cursor
// for parsing them.
//
// MappedFile maps a whole file read-only (mmap on POSIX) so that multi-GB
// weights are paged in on demand and shared with the page cache instead of
// being copied; where mapping is unavailable or fails it falls back to reading
// the file into a heap buffer. Either way data() is stable for the lifetime of
// the object and across moves, so parsers (GgufReader, the model loaders) may
// keep pointers into it.
//
// ByteReader is the only way the parsers in this directory touch file bytes:
// every read checks the remaining length first, so a truncated or corrupt file
// produces a DataLoss status naming the field, never an out-of-bounds read.
//
// Plain header: no Highway, no exceptions. Hosts must be little-endian (all
// supported mobile and desktop targets are); the formats read here are.
#ifndef LUTRA_MAPPED_FILE_H_
#define LUTRA_MAPPED_FILE_H_

#include <stddef.h>
#include <stdint.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#define LUTRA_HAVE_MMAP 1
#else
#define LUTRA_HAVE_MMAP 0
#endif

#include "lutra/base/status.h"

namespace lutra {

// True when this host stores integers little-endian (the file formats' order).
inline bool HostIsLittleEndian() {
  const uint32_t one = 1;
  uint8_t first = 0;
  std::memcpy(&first, &one, 1);
  return first == 1;
}

// a * b, or false when the product does not fit in uint64_t.
inline bool CheckedMul(uint64_t a, uint64_t b, uint64_t* out) {
  if (a != 0 && b > std::numeric_limits<uint64_t>::max() / a) return false;
  *out = a * b;
  return true;
}
// a + b, or false on overflow.
inline bool CheckedAdd(uint64_t a, uint64_t b, uint64_t* out) {
  if (b > std::numeric_limits<uint64_t>::max() - a) return false;
  *out = a + b;
  return true;
}

// The one memory-budget check of the loaders (docs/reliability.md): fails
// with ResourceExhausted naming `what` when `bytes` exceed `max_bytes`
// (0: no limit). Callers check before they allocate.
inline Status CheckMemoryBudget(uint64_t bytes, uint64_t max_bytes, const std::string& what) {
  if (max_bytes != 0 && bytes > max_bytes) {
    return ResourceExhausted("%s needs %llu bytes, above the memory budget of %llu bytes",
                             what.c_str(), static_cast<unsigned long long>(bytes),
                             static_cast<unsigned long long>(max_bytes));
  }
  return Status::Ok();
}

// A whole file, read-only. Move-only; data() stays valid (and at the same
// address) until the object that holds it is destroyed.
class MappedFile {
 public:
  enum class Mode {
    kMapOrRead,  // mmap where possible, else read into a buffer
    kRead,       // always read into a heap buffer (no mapping)
  };

  MappedFile() = default;
  MappedFile(MappedFile&& other) noexcept { *this = std::move(other); }
  MappedFile& operator=(MappedFile&& other) noexcept {
    if (this != &other) {
      Release();
      path_ = std::move(other.path_);
      buffer_ = std::move(other.buffer_);
      map_ = other.map_;
      map_size_ = other.map_size_;
      data_ = other.data_;
      size_ = other.size_;
      other.map_ = nullptr;
      other.map_size_ = 0;
      other.data_ = nullptr;
      other.size_ = 0;
    }
    return *this;
  }
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  ~MappedFile() { Release(); }

  // Opens `path`. A mapping costs no heap; a file read into memory (kRead,
  // or where mapping fails) may use at most `max_read_bytes` (0: no limit),
  // checked before reading. Errors: NotFound "open 'path': <strerror>" when
  // the file cannot be opened, DataLoss for read errors, InvalidArgument for
  // a directory, ResourceExhausted for a file too large to address or above
  // max_read_bytes.
  //
  // A mapped file must not shrink or change while mapped: pages past a new
  // end fault with SIGBUS, changed pages may be seen (docs/model-files.md).
  // kRead takes a private copy and is immune to both.
  static StatusOr<MappedFile> Open(const std::string& path,
                                   Mode mode = Mode::kMapOrRead,
                                   uint64_t max_read_bytes = 0) {
    MappedFile file;
    file.path_ = path;
#if LUTRA_HAVE_MMAP
    if (mode == Mode::kMapOrRead) {
      const int fd = ::open(path.c_str(), O_RDONLY);
      if (fd < 0) {
        const int err = errno;
        return NotFound("open '%s': %s", path.c_str(), std::strerror(err));
      }
      struct stat st;
      if (::fstat(fd, &st) != 0) {
        const int err = errno;
        ::close(fd);
        return DataLoss("stat '%s': %s", path.c_str(), std::strerror(err));
      }
      if (S_ISDIR(st.st_mode)) {
        ::close(fd);
        return InvalidArgument("open '%s': is a directory", path.c_str());
      }
      if (S_ISREG(st.st_mode) &&
          static_cast<uint64_t>(st.st_size) > std::numeric_limits<size_t>::max() / 2) {
        // 32-bit hosts: neither a mapping nor a buffer can hold it.
        ::close(fd);
        return ResourceExhausted("open '%s': %lld bytes do not fit in this address space",
                                 path.c_str(), static_cast<long long>(st.st_size));
      }
      if (S_ISREG(st.st_mode) && st.st_size > 0) {
        const size_t size = static_cast<size_t>(st.st_size);
        void* map = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (map != MAP_FAILED) {
          ::close(fd);  // the mapping keeps the file alive
          file.map_ = map;
          file.map_size_ = size;
          file.data_ = static_cast<const uint8_t*>(map);
          file.size_ = size;
          return file;
        }
      }
      ::close(fd);  // empty, special or unmappable file: read it instead
    }
#else
    (void)mode;
#endif
    LUTRA_RETURN_IF_ERROR(file.ReadAll(max_read_bytes));
    return file;
  }

  // Wraps bytes already in memory (tests, embedded models, downloads).
  static MappedFile FromBuffer(std::vector<uint8_t> bytes,
                               std::string name = "<memory>") {
    MappedFile file;
    file.path_ = std::move(name);
    file.buffer_ = std::move(bytes);
    file.data_ = file.buffer_.data();
    file.size_ = file.buffer_.size();
    return file;
  }

  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  // The path given to Open (or the name given to FromBuffer), for messages.
  const std::string& path() const { return path_; }
  // True when backed by mmap rather than a heap buffer.
  bool is_mapped() const { return map_ != nullptr; }

 private:
  // Reads the whole file into buffer_, at most max_bytes (0: no limit).
  Status ReadAll(uint64_t max_bytes) {
    std::FILE* f = std::fopen(path_.c_str(), "rb");
    if (f == nullptr) {
      const int err = errno;
      return NotFound("open '%s': %s", path_.c_str(), std::strerror(err));
    }
    const std::string what = "reading '" + path_ + "' into memory";
    std::vector<uint8_t> bytes;
#if LUTRA_HAVE_MMAP
    // A regular file's size is known: refuse it before reading, and reserve
    // once so the buffer never holds more than the file (no doubling).
    struct stat st;
    if (::fstat(::fileno(f), &st) == 0 && S_ISREG(st.st_mode)) {
      const Status budget = CheckMemoryBudget(uint64_t(st.st_size), max_bytes, what);
      if (!budget.ok()) {
        std::fclose(f);
        return budget;
      }
      bytes.reserve(static_cast<size_t>(st.st_size));
    }
#endif
    // Read in chunks until EOF rather than trusting a seek-reported size, so
    // pipes and special files work and a file shrinking under us is caught.
    uint8_t chunk[1 << 16];
    for (;;) {
      const size_t got = std::fread(chunk, 1, sizeof(chunk), f);
      const Status budget = CheckMemoryBudget(uint64_t(bytes.size()) + got, max_bytes, what);
      if (!budget.ok()) {
        std::fclose(f);
        return budget;
      }
      bytes.insert(bytes.end(), chunk, chunk + got);
      if (got < sizeof(chunk)) break;
    }
    const bool failed = std::ferror(f) != 0;
    const int err = errno;
    std::fclose(f);
    if (failed) {
      return DataLoss("read '%s': %s", path_.c_str(), std::strerror(err));
    }
    buffer_ = std::move(bytes);
    data_ = buffer_.data();
    size_ = buffer_.size();
    return Status::Ok();
  }

  void Release() {
#if LUTRA_HAVE_MMAP
    if (map_ != nullptr) ::munmap(map_, map_size_);
#endif
    map_ = nullptr;
    map_size_ = 0;
    buffer_.clear();
    data_ = nullptr;
    size_ = 0;
  }

  std::string path_;
  std::vector<uint8_t> buffer_;  // used when not mapped
  void* map_ = nullptr;
  size_t map_size_ = 0;
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

// Sequential little-endian reads from [data, data + size) with bounds checks.
// Each Read* names `what` in its error, e.g.
// "gguf: truncated at offset 24 reading key length of metadata entry 3 (need 8 bytes, 2 left)".
class ByteReader {
 public:
  // `prefix` starts every message ("gguf", "llama2c", "tokenizer").
  ByteReader(const uint8_t* data, size_t size, const char* prefix)
      : data_(data), size_(size), prefix_(prefix) {}

  size_t pos() const { return pos_; }
  size_t size() const { return size_; }
  size_t remaining() const { return size_ - pos_; }
  const uint8_t* data() const { return data_; }
  const uint8_t* current() const { return data_ + pos_; }

  // Fails unless `n` more bytes are available; `what` describes the field.
  Status Require(uint64_t n, const std::string& what) const {
    if (n > remaining()) {
      return DataLoss("%s: truncated at offset %zu reading %s (need %llu bytes, %zu left)",
                      prefix_, pos_, what.c_str(), static_cast<unsigned long long>(n),
                      remaining());
    }
    return Status::Ok();
  }

  template <class T>
  Status Read(T* out, const std::string& what) {
    LUTRA_RETURN_IF_ERROR(Require(sizeof(T), what));
    std::memcpy(out, data_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return Status::Ok();
  }

  // Returns a pointer to the next n bytes and advances past them.
  Status Take(uint64_t n, const uint8_t** out, const std::string& what) {
    LUTRA_RETURN_IF_ERROR(Require(n, what));
    *out = data_ + pos_;
    pos_ += static_cast<size_t>(n);
    return Status::Ok();
  }

  Status Skip(uint64_t n, const std::string& what) {
    const uint8_t* unused = nullptr;
    return Take(n, &unused, what);
  }

 private:
  const uint8_t* data_ = nullptr;
  size_t size_;
  size_t pos_ = 0;
  const char* prefix_;
};

}  // namespace lutra

#endif  // LUTRA_MAPPED_FILE_H_
