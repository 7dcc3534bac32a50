/*
 * The console: bytes go to the 16550 UART's data register (COM1, port 0x3F8) with real
 * `out` instructions that vsmp patch marks and the monitor emulates. A buffer goes out with
 * one `rep outsb` (one trap for the whole buffer); the monitor's UART transmits at once, so
 * there is no need to poll the line status register (docs/guest-platform.md, "I/O ports").
 */
#include <vsmp.h>

#define COM1_DATA 0x3F8
/* printf formats into a stack buffer of this many bytes and flushes it when full. */
#define PRINTF_CHUNK 256

void vsmp_putc(char c)
{
    __asm__ __volatile__("outb %0, %1" : : "a"(c), "Nd"((uint16_t)COM1_DATA));
}

void vsmp_write(const char *buf, size_t n)
{
    if (n == 0)
        return;
    __asm__ __volatile__("cld; rep outsb"
                         : "+S"(buf), "+c"(n)
                         : "d"((uint16_t)COM1_DATA)
                         : "memory", "cc");
}

void vsmp_puts(const char *s)
{
    vsmp_write(s, vsmp_strlen(s));
    vsmp_putc('\n');
}

/* ---- formatting ---- */

/* Where formatted bytes go: a bounded buffer, or the console through a chunk buffer. */
struct sink {
    char *buf;
    size_t cap;   /* bytes buf can hold */
    size_t used;  /* bytes in buf */
    size_t total; /* bytes produced */
    int console;  /* flush buf to the console when full */
};

static void sink_flush(struct sink *s)
{
    if (s->console) {
        vsmp_write(s->buf, s->used);
        s->used = 0;
    }
}

static void sink_put(struct sink *s, char c)
{
    if (s->used == s->cap)
        sink_flush(s);
    if (s->used < s->cap)
        s->buf[s->used++] = c;
    s->total++;
}

static void sink_repeat(struct sink *s, char c, int n)
{
    while (n-- > 0)
        sink_put(s, c);
}

struct spec {
    int left;      /* '-' */
    int zero;      /* '0' */
    int width;     /* minimum field width */
    int precision; /* -1: none */
};

static void put_field(struct sink *s, const struct spec *sp, const char *prefix,
                      const char *digits, int ndigits)
{
    int plen = (int)vsmp_strlen(prefix);
    int zeros = sp->precision > ndigits ? sp->precision - ndigits : 0;
    int len = plen + zeros + ndigits;
    int pad = sp->width > len ? sp->width - len : 0;
    if (sp->zero && !sp->left && sp->precision < 0) {
        zeros += pad;
        pad = 0;
    }
    if (!sp->left)
        sink_repeat(s, ' ', pad);
    for (int i = 0; i < plen; i++)
        sink_put(s, prefix[i]);
    sink_repeat(s, '0', zeros);
    for (int i = 0; i < ndigits; i++)
        sink_put(s, digits[i]);
    if (sp->left)
        sink_repeat(s, ' ', pad);
}

static void put_unsigned(struct sink *s, const struct spec *sp, const char *prefix,
                         unsigned long long v, unsigned base, int upper)
{
    const char *alphabet = upper ? "0123456789ABCDEF" : "0123456789abcdef";
    char tmp[24];
    int n = 0;
    do {
        tmp[n++] = alphabet[v % base];
        v /= base;
    } while (v != 0);
    if (sp->precision == 0 && n == 1 && tmp[0] == '0')
        n = 0; /* "%.0d" of zero prints no digits */
    char digits[24];
    for (int i = 0; i < n; i++)
        digits[i] = tmp[n - 1 - i];
    put_field(s, sp, prefix, digits, n);
}

static void put_string(struct sink *s, const struct spec *sp, const char *str)
{
    if (str == NULL)
        str = "(null)";
    int n = 0;
    while (str[n] != '\0' && (sp->precision < 0 || n < sp->precision))
        n++;
    struct spec plain = *sp;
    plain.zero = 0;
    plain.precision = -1;
    put_field(s, &plain, "", str, n);
}

enum length { LEN_INT, LEN_CHAR, LEN_SHORT, LEN_LONG, LEN_LLONG, LEN_SIZE };

static void format(struct sink *s, const char *fmt, va_list ap)
{
    for (const char *p = fmt; *p != '\0'; p++) {
        if (*p != '%') {
            sink_put(s, *p);
            continue;
        }
        const char *start = p++;
        struct spec sp = {0, 0, 0, -1};
        for (;; p++) {
            if (*p == '-')
                sp.left = 1;
            else if (*p == '0')
                sp.zero = 1;
            else if (*p != ' ' && *p != '+' && *p != '#')
                break;
        }
        if (*p == '*') {
            sp.width = va_arg(ap, int);
            if (sp.width < 0) {
                sp.left = 1;
                sp.width = -sp.width;
            }
            p++;
        } else {
            while (*p >= '0' && *p <= '9')
                sp.width = sp.width * 10 + (*p++ - '0');
        }
        if (*p == '.') {
            p++;
            sp.precision = 0;
            if (*p == '*') {
                sp.precision = va_arg(ap, int);
                p++;
            } else {
                while (*p >= '0' && *p <= '9')
                    sp.precision = sp.precision * 10 + (*p++ - '0');
            }
        }
        enum length len = LEN_INT;
        if (*p == 'h') {
            p++;
            len = LEN_SHORT;
            if (*p == 'h') {
                p++;
                len = LEN_CHAR;
            }
        } else if (*p == 'l') {
            p++;
            len = LEN_LONG;
            if (*p == 'l') {
                p++;
                len = LEN_LLONG;
            }
        } else if (*p == 'z') {
            p++;
            len = LEN_SIZE;
        }
        switch (*p) {
        case 'd':
        case 'i': {
            long long v;
            switch (len) {
            case LEN_LONG: v = va_arg(ap, long); break;
            case LEN_LLONG: v = va_arg(ap, long long); break;
            case LEN_SIZE: v = (long long)va_arg(ap, size_t); break;
            case LEN_CHAR: v = (signed char)va_arg(ap, int); break;
            case LEN_SHORT: v = (short)va_arg(ap, int); break;
            default: v = va_arg(ap, int); break;
            }
            unsigned long long mag = v < 0 ? 0ULL - (unsigned long long)v : (unsigned long long)v;
            put_unsigned(s, &sp, v < 0 ? "-" : "", mag, 10, 0);
            break;
        }
        case 'u':
        case 'x':
        case 'X': {
            unsigned long long v;
            switch (len) {
            case LEN_LONG: v = va_arg(ap, unsigned long); break;
            case LEN_LLONG: v = va_arg(ap, unsigned long long); break;
            case LEN_SIZE: v = va_arg(ap, size_t); break;
            case LEN_CHAR: v = (unsigned char)va_arg(ap, unsigned); break;
            case LEN_SHORT: v = (unsigned short)va_arg(ap, unsigned); break;
            default: v = va_arg(ap, unsigned); break;
            }
            put_unsigned(s, &sp, "", v, *p == 'u' ? 10 : 16, *p == 'X');
            break;
        }
        case 'p':
            put_unsigned(s, &sp, "0x", (uintptr_t)va_arg(ap, void *), 16, 0);
            break;
        case 's':
            put_string(s, &sp, va_arg(ap, const char *));
            break;
        case 'c': {
            char c = (char)va_arg(ap, int);
            struct spec plain = sp;
            plain.zero = 0;
            plain.precision = -1;
            put_field(s, &plain, "", &c, 1);
            break;
        }
        case '%':
            sink_put(s, '%');
            break;
        default:
            /* Unknown conversion (or the string ended): print it as written. */
            for (const char *q = start; q <= p && *q != '\0'; q++)
                sink_put(s, *q);
            if (*p == '\0')
                return;
            break;
        }
    }
}

int vsmp_vprintf(const char *fmt, va_list ap)
{
    char chunk[PRINTF_CHUNK];
    struct sink s = {chunk, sizeof chunk, 0, 0, 1};
    format(&s, fmt, ap);
    sink_flush(&s);
    return (int)s.total;
}

int vsmp_printf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsmp_vprintf(fmt, ap);
    va_end(ap);
    return n;
}

int vsmp_vsnprintf(char *buf, size_t size, const char *fmt, va_list ap)
{
    struct sink s = {buf, size == 0 ? 0 : size - 1, 0, 0, 0};
    format(&s, fmt, ap);
    if (size != 0)
        buf[s.used] = '\0';
    return (int)s.total;
}

int vsmp_snprintf(char *buf, size_t size, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsmp_vsnprintf(buf, size, fmt, ap);
    va_end(ap);
    return n;
}
