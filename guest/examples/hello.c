/* The smallest vsmp guest: greets from every vCPU and exits 0. */
#include <vsmp.h>

int main(void)
{
    vsmp_printf("hello from vCPU %u of %u\n", vsmp_cpu_id(), vsmp_cpu_count());
    return 0;
}
