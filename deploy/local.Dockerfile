# The local stand-ins for the registry's Kafka and Prometheus images, used by
# deploy/compose.local.yaml: binaries from this machine (Tansu built by ci/lib.sh, Prometheus
# from Debian's package) on the debootstrapped Debian 12 base. ci/deploy.sh builds them with a
# context holding the two binaries.
ARG BASE=spillway-debian:bookworm

FROM ${BASE} AS tansu
COPY tansu /usr/local/bin/tansu
WORKDIR /var/lib/tansu
ENTRYPOINT ["/usr/local/bin/tansu"]

FROM ${BASE} AS prometheus
COPY prometheus /usr/local/bin/prometheus
WORKDIR /prometheus
ENTRYPOINT ["/usr/local/bin/prometheus"]
