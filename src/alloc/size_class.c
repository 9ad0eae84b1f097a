#include "alloc/size_class.h"

/* sl_sc_lookup[(size + 15) / 16] for sizes up to 64 KiB: the smallest class
 * whose size is at least 16 * entry, shifted by SL_SC_LOOKUP_SHIFT, so that
 * the hot path finds a class's bin (64 bytes each) with one load and one
 * add. Filled from sl_sc_sizes when the program (or the library) is
 * loaded, before anything can allocate. */
uint16_t sl_sc_lookup[SL_SC_LOOKUP_MAX / 16 + 1];

/* sl_sc_size(idx), from the closed form in size_class.h. */
const uint32_t sl_sc_sizes[SL_SC_MAX_CLASSES] = {
    16, 32, 48, 64, 80, 96, 112, 128,
    160, 192, 224, 256, 320, 384, 448, 512,
    640, 768, 896, 1024, 1280, 1536, 1792, 2048,
    2560, 3072, 3584, 4096, 5120, 6144, 7168, 8192,
    10240, 12288, 14336, 16384, 20480, 24576, 28672, 32768,
    40960, 49152, 57344, 65536, 81920, 98304, 114688, 131072,
    163840, 196608, 229376, 262144, 327680, 393216, 458752, 524288,
    655360, 786432, 917504, 1048576, 1310720, 1572864, 1835008, 2097152,
    2621440, 3145728, 3670016, 4194304, 5242880, 6291456, 7340032, 8388608,
    10485760, 12582912, 14680064, 16777216, 20971520, 25165824, 29360128, 33554432,
};

__attribute__((constructor)) static void sl_sc_fill_lookup(void) {
  unsigned c = 0;
  for (size_t i = 0; i <= SL_SC_LOOKUP_MAX / 16; i++) {
    while (sl_sc_sizes[c] < i * 16) c++;
    sl_sc_lookup[i] = (uint16_t)(c << SL_SC_LOOKUP_SHIFT);
  }
}

unsigned sl_sc_count(size_t max_size) { return sl_sc_index(max_size) + 1; }
