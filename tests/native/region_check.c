/*
 * Test driver for the region decoder's resize (preprocess/_jpegregion.c), built for x86_64 and
 * for aarch64 by scripts/check-aarch64.sh (`make check-aarch64`), which runs the aarch64 build
 * under qemu-aarch64 and compares the pixels of every build and path bit for bit.
 *
 *     region_check [--scalar] OUT.bin FILE.jpg...
 *
 * For each file, each Pillow filter and several resize/crop specs (odd crop widths exercise the
 * scalar tail after the vector pixels), with one of two decode flag sets in turn (the filter's
 * index picks it, so each spec meets both), it runs ie_fast_crop (the one
 * call fast mode makes) and appends the crop's RGB pixels to OUT.bin; stdout gets one line per
 * case with the return code and an FNV-1a hash of the pixels, so a diff of two runs names the
 * cases that differ. --scalar sets IE_SCALAR (the scalar passes); otherwise the vector path of
 * the build runs (NEON on aarch64, AVX2 or SSE4.1 on x86_64), named on stderr.
 *
 * The C file is included, not linked, so the driver sees the flags and the path macros.
 */
#include "../../preprocess/_jpegregion.c"

struct spec {
  int resize_short, resize_w, resize_h, crop_w, crop_h;
};

static const struct spec SPECS[] = {
  { 256, 0, 0, 224, 224 }, /* ImageNet's Resize(256) + CenterCrop(224) */
  { 232, 0, 0, 227, 221 }, /* odd widths: vector pixels and a scalar tail in each row */
  { 0, 256, 256, 225, 224 }, /* the reference script's square Resize([256, 256]) */
  { 0, 96, 80, 93, 77 },     /* small: rows shorter than one vector step near the end */
  { 0, 560, 420, 131, 97 },  /* upscaling (of most files), a small crop of it */
  { 120, 0, 0, 160, 150 },   /* a crop larger than the image: zeros around */
};
static const int FILTERS[] = { IE_BILINEAR, IE_BICUBIC, IE_LANCZOS, IE_BOX, IE_HAMMING };
static const int DECODE_FLAGS[] = { 0, IE_FASTDCT | IE_FASTUPSAMPLE };

static unsigned long long fnv1a(const unsigned char *p, size_t n)
{
  unsigned long long h = 1469598103934665603ULL;
  size_t i;

  for (i = 0; i < n; i++) {
    h ^= p[i];
    h *= 1099511628211ULL;
  }
  return h;
}

static const char *vector_path(void)
{
#if IE_SSE41
  return __builtin_cpu_supports("avx2") ? "avx2" : (__builtin_cpu_supports("sse4.1") ? "sse4.1" : "scalar");
#elif IE_NEON
  return "neon";
#else
  return "scalar";
#endif
}

static unsigned char *read_file(const char *path, unsigned long *size)
{
  FILE *f = fopen(path, "rb");
  unsigned char *buf;
  long n;

  if (!f)
    return NULL;
  if (fseek(f, 0, SEEK_END) != 0 || (n = ftell(f)) <= 0 || fseek(f, 0, SEEK_SET) != 0) {
    fclose(f);
    return NULL;
  }
  buf = (unsigned char *)malloc((size_t)n);
  if (buf && fread(buf, 1, (size_t)n, f) != (size_t)n) {
    free(buf);
    buf = NULL;
  }
  fclose(f);
  *size = (unsigned long)n;
  return buf;
}

int main(int argc, char **argv)
{
  int scalar = 0, a = 1, fi, si, fl, cases = 0, ok = 0;
  unsigned long work_size = 1UL << 20;
  unsigned char *work = (unsigned char *)malloc(work_size);
  FILE *out;

  if (argc > a && strcmp(argv[a], "--scalar") == 0) {
    scalar = 1;
    a++;
  }
  if (argc - a < 2) {
    fprintf(stderr, "usage: %s [--scalar] OUT.bin FILE.jpg...\n", argv[0]);
    return 2;
  }
  out = fopen(argv[a], "wb");
  if (!out || !work) {
    fprintf(stderr, "region_check: cannot open %s or allocate\n", argv[a]);
    return 2;
  }
  fprintf(stderr, "region_check: resize path %s\n", scalar ? "scalar (IE_SCALAR)" : vector_path());
  for (fi = a + 1; fi < argc; fi++) {
    unsigned long size;
    unsigned char *data = read_file(argv[fi], &size);
    const char *name = strrchr(argv[fi], '/') ? strrchr(argv[fi], '/') + 1 : argv[fi];

    if (!data) {
      fprintf(stderr, "region_check: cannot read %s\n", argv[fi]);
      return 2;
    }
    for (si = 0; si < (int)(sizeof(SPECS) / sizeof(SPECS[0])); si++)
      for (fl = 0; fl < (int)(sizeof(FILTERS) / sizeof(FILTERS[0])); fl++)
        {
          const struct spec *s = &SPECS[si];
          size_t n = (size_t)s->crop_w * (size_t)s->crop_h * 3;
          unsigned char *dst = (unsigned char *)malloc(n);
          int info[3], rc, flags = DECODE_FLAGS[fl % 2] | (scalar ? IE_SCALAR : 0);
          char msg[200] = "";

          memset(dst, 0xA5, n); /* the same start in every run, so only what the call writes can differ */
          rc = ie_fast_crop(data, size, s->resize_short, s->resize_w, s->resize_h, s->crop_w, s->crop_h,
                            FILTERS[fl], flags, 0, -1, dst, (long)s->crop_w * 3, work, work_size, info, msg,
                            (int)sizeof(msg));
          if (rc == IE_NEED_WORK) {
            work_size = (unsigned long)info[2];
            free(work);
            work = (unsigned char *)malloc(work_size);
            if (!work) {
              fprintf(stderr, "region_check: out of memory\n");
              return 2;
            }
            rc = ie_fast_crop(data, size, s->resize_short, s->resize_w, s->resize_h, s->crop_w, s->crop_h,
                              FILTERS[fl], flags, 0, -1, dst, (long)s->crop_w * 3, work, work_size, info, msg,
                              (int)sizeof(msg));
          }
          printf("%s resize=%d/%dx%d crop=%dx%d filter=%d decode=%d rc=%d pixels=%016llx\n", name,
                 s->resize_short, s->resize_w, s->resize_h, s->crop_w, s->crop_h, FILTERS[fl], DECODE_FLAGS[fl % 2],
                 rc, rc == IE_OK ? fnv1a(dst, n) : 0ULL);
          if (rc == IE_OK && fwrite(dst, 1, n, out) != n) {
            fprintf(stderr, "region_check: cannot write %s\n", argv[a]);
            return 2;
          }
          cases++;
          ok += rc == IE_OK;
          free(dst);
        }
    free(data);
  }
  fclose(out);
  free(work);
  fprintf(stderr, "region_check: %d cases, %d resized\n", cases, ok);
  return ok > 0 ? 0 : 1;
}
