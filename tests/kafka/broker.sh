#!/usr/bin/env bash
# Apache Kafka, the reference broker for paysync's tests, chaos runs and
# benchmarks: one KRaft node (broker and controller in one JVM), no Docker.
#
#   tests/kafka/broker.sh fetch            # the jars, once (Maven Central; cached outside the repo)
#   tests/kafka/broker.sh start DIR        # format DIR, start a node on free ports; prints the bootstrap address
#   tests/kafka/broker.sh stop DIR         # SIGTERM, then SIGKILL after 30 s
#   tests/kafka/broker.sh kill DIR         # SIGKILL (a crash)
#   tests/kafka/broker.sh restart DIR      # stop, then start again on the same ports and data
#   tests/kafka/broker.sh bootstrap DIR    # the bootstrap address of a running node
#
# Environment:
#   PAYSYNC_KAFKA_VERSION   kafka_2.13 version (default 4.1.1)
#   PAYSYNC_KAFKA_CACHE     where the jars go (default ~/.cache/paysync-kafka)
#   PAYSYNC_KAFKA_HEAP      JVM heap (default 768m)
#   PAYSYNC_KAFKA_PROPS     extra server.properties lines, separated by ';'
#
# DIR holds server.properties, the data, server.log, pid and bootstrap. The node
# is sized for tests: one replica everywhere (the offsets and transaction-state
# topics included), no initial rebalance delay, no topic auto-creation (paysync
# never creates topics; tests create theirs).
set -euo pipefail

version="${PAYSYNC_KAFKA_VERSION:-4.1.1}"
cache="${PAYSYNC_KAFKA_CACHE:-${HOME}/.cache/paysync-kafka}"
libs="${cache}/kafka_2.13-${version}/libs"
heap="${PAYSYNC_KAFKA_HEAP:-768m}"

die() { echo "broker.sh: $*" >&2; exit 1; }

fetch() {
  if [[ -f "${libs}/.complete" ]]; then
    return
  fi
  command -v mvn >/dev/null || die "Maven (mvn) is needed to fetch the Kafka jars"
  local tmp
  tmp=$(mktemp -d)
  # log4j-slf4j-impl: Kafka 4.x logs through SLF4J 1.7 and ships log4j2.
  cat >"${tmp}/pom.xml" <<EOF
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>io.paysync.test</groupId><artifactId>kafka-broker</artifactId><version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>${version}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl</artifactId><version>2.25.3</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId><version>2.25.3</version></dependency>
  </dependencies>
</project>
EOF
  echo "broker.sh: fetching kafka_2.13 ${version} and its dependencies from Maven Central" >&2
  rm -rf "${libs}"
  mkdir -p "${libs}"
  (cd "${tmp}" && mvn -q -B dependency:copy-dependencies -DincludeScope=runtime \
    -DoutputDirectory="${libs}") >&2 || die "mvn could not fetch kafka_2.13 ${version}"
  rm -rf "${tmp}"
  touch "${libs}/.complete"
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# Runs java; always called in a subshell (it execs), so that `$!` is the JVM.
java_cmd() {
  local dir=$1
  shift
  exec java "-Xmx${heap}" -Xms256m -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -Djava.awt.headless=true \
    "-Dlog4j2.configurationFile=${dir}/log4j2.xml" -cp "${libs}/*" "$@"
}

configure() {
  local dir=$1 port ctl
  port=$(free_port)
  ctl=$(free_port)
  while [[ "${ctl}" == "${port}" ]]; do ctl=$(free_port); done
  mkdir -p "${dir}/data"
  cat >"${dir}/server.properties" <<EOF
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:${ctl}
listeners=PLAINTEXT://127.0.0.1:${port},CONTROLLER://127.0.0.1:${ctl}
advertised.listeners=PLAINTEXT://127.0.0.1:${port}
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
log.dirs=${dir}/data
num.partitions=1
auto.create.topics.enable=false
offsets.topic.replication.factor=1
offsets.topic.num.partitions=8
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=8
group.initial.rebalance.delay.ms=0
group.min.session.timeout.ms=1000
share.coordinator.state.topic.replication.factor=1
EOF
  if [[ -n "${PAYSYNC_KAFKA_PROPS:-}" ]]; then
    tr ';' '\n' <<<"${PAYSYNC_KAFKA_PROPS}" >>"${dir}/server.properties"
  fi
  cat >"${dir}/log4j2.xml" <<EOF
<Configuration status="warn">
  <Appenders><File name="file" fileName="${dir}/server.log"><PatternLayout pattern="[%d] %p %m (%c)%n"/></File></Appenders>
  <Loggers>
    <Logger name="kafka.request.logger" level="warn"/>
    <Logger name="org.apache.kafka.storage" level="warn"/>
    <Root level="info"><AppenderRef ref="file"/></Root>
  </Loggers>
</Configuration>
EOF
  echo "127.0.0.1:${port}" >"${dir}/bootstrap"
  local cluster
  cluster=$(java_cmd "${dir}" kafka.tools.StorageTool random-uuid)
  (java_cmd "${dir}" kafka.tools.StorageTool format -t "${cluster}" -c "${dir}/server.properties" \
    >"${dir}/format.log" 2>&1) || { cat "${dir}/format.log" >&2; die "formatting ${dir} failed"; }
}

launch() {
  local dir=$1
  (java_cmd "${dir}" kafka.Kafka "${dir}/server.properties" >"${dir}/stdout.log" 2>&1) &
  echo $! >"${dir}/pid"
  local bootstrap host port
  bootstrap=$(cat "${dir}/bootstrap")
  host=${bootstrap%:*}
  port=${bootstrap##*:}
  # Ready when the node has started (KRaft log line) and its listener accepts.
  for _ in $(seq 1 600); do
    if ! kill -0 "$(cat "${dir}/pid")" 2>/dev/null; then
      tail -n 40 "${dir}/stdout.log" "${dir}/server.log" >&2 || true
      die "the broker exited during start-up"
    fi
    if grep -q "Kafka Server started" "${dir}/server.log" 2>/dev/null \
      && (exec 3<>"/dev/tcp/${host}/${port}") 2>/dev/null; then
      echo "${bootstrap}"
      return
    fi
    sleep 0.1
  done
  die "the broker did not start within 60 s (log: ${dir}/server.log)"
}

stop() {
  local dir=$1 signal=${2:-TERM} pid
  [[ -f "${dir}/pid" ]] || return 0
  pid=$(cat "${dir}/pid")
  kill "-${signal}" "${pid}" 2>/dev/null || { rm -f "${dir}/pid"; return 0; }
  for _ in $(seq 1 300); do
    kill -0 "${pid}" 2>/dev/null || { rm -f "${dir}/pid"; return 0; }
    sleep 0.1
  done
  kill -KILL "${pid}" 2>/dev/null || true
  rm -f "${dir}/pid"
}

cmd=${1:-}
case "${cmd}" in
  fetch) fetch ;;
  start)
    dir=${2:?usage: broker.sh start DIR}
    mkdir -p "${dir}"
    dir=$(cd "${dir}" && pwd)
    [[ -e "${dir}/data/meta.properties" ]] &&
      die "${dir} already holds a formatted node: 'restart ${dir}' starts it again, or remove ${dir} for a new one"
    fetch
    configure "${dir}"
    : >"${dir}/server.log"
    launch "${dir}"
    ;;
  restart)
    dir=$(cd "${2:?usage: broker.sh restart DIR}" && pwd)
    stop "${dir}"
    : >"${dir}/server.log"
    launch "${dir}"
    ;;
  stop) stop "${2:?usage: broker.sh stop DIR}" ;;
  kill) stop "${2:?usage: broker.sh kill DIR}" KILL ;;
  bootstrap) cat "${2:?usage: broker.sh bootstrap DIR}/bootstrap" ;;
  *) die "usage: broker.sh fetch | start DIR | stop DIR | kill DIR | restart DIR | bootstrap DIR" ;;
esac
