#include "buf/holder.h"

#include <sys/mman.h>

#include "util/common.h"

int sl_holder_enable(sl_pool *p) {
  if (p->holders != NULL) return SL_OK;
  size_t len = (size_t)p->hdr_max * sizeof(sl_holder);
  void *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                 -1, 0);
  if (m == MAP_FAILED) return SL_ERROR;
  p->holders = m;
  p->holders_map_len = len;
  return SL_OK;
}

void sl_holder_disable(sl_pool *p) {
  if (p->holders == NULL) return;
  munmap(p->holders, p->holders_map_len);
  p->holders = NULL;
  p->holders_map_len = 0;
}

void sl_holder_walk(sl_pool *p, void (*fn)(void *ud, const sl_buf *b, const void *who),
                    void *ud) {
  for (uint32_t slot = 1; slot < p->hdr_next; slot++) {
    const sl_buf *b = (const sl_buf *)(const void *)(p->hdr_base + (size_t)slot * SL_HDR_SIZE);
    if (b->gen == 0 || (b->flags & SL_BUF_VIEW) || b->refcnt == 0) continue;
    const void *who = NULL;
    if (p->holders != NULL && p->holders[slot].gen == b->gen) who = p->holders[slot].who;
    fn(ud, b, who);
  }
}
