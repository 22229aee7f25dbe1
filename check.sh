#!/usr/bin/env bash
# check.sh is the project's one entry to its checks.
#
#   ./check.sh          everything CI runs: fmt, vet, lint (when staticcheck is
#                       installed), test (race detector, coverage floor), e2e
#   ./check.sh fmt      gofmt check
#   ./check.sh vet      go vet
#   ./check.sh lint     staticcheck, skipped when it is not installed
#   ./check.sh test     go test -race with coverage; fails below the floor
#   ./check.sh cover    coverage report as HTML in coverage.html
#   ./check.sh e2e      builds the binary, drives it over HTTP, stops it with SIGTERM
#   ./check.sh bench    benchmarks with allocation counts (BENCHTIME=1s by default)
#   ./check.sh fuzz     fuzzes the entry decoder (FUZZTIME=30s by default)
set -euo pipefail
cd "$(dirname "$0")"

COVERAGE_FLOOR=90

step() { printf '\n== %s\n' "$*"; }

check_fmt() {
	step "gofmt"
	local bad
	bad=$(gofmt -l .)
	if [[ -n $bad ]]; then
		echo "not gofmt-formatted (run gofmt -w .):"
		echo "$bad"
		return 1
	fi
	echo "ok"
}

check_vet() {
	step "go vet"
	go vet ./...
	echo "ok"
}

check_lint() {
	step "staticcheck"
	if ! command -v staticcheck >/dev/null 2>&1; then
		echo "skipped: staticcheck is not installed"
		return 0
	fi
	staticcheck ./...
	echo "ok"
}

check_test() {
	step "go test -race -cover (floor ${COVERAGE_FLOOR}%)"
	local profile
	profile=$(mktemp)
	go test -race -count=1 -coverprofile="$profile" ./...
	local total
	total=$(go tool cover -func="$profile" | awk '/^total:/ { sub("%", "", $3); print $3 }')
	rm -f "$profile"
	echo "coverage: ${total}%"
	if awk -v t="$total" -v f="$COVERAGE_FLOOR" 'BEGIN { exit !(t < f) }'; then
		echo "coverage ${total}% is below the floor of ${COVERAGE_FLOOR}%"
		return 1
	fi
}

check_cover() {
	step "coverage report"
	go test -count=1 -coverprofile=coverage.out ./...
	go tool cover -html=coverage.out -o coverage.html
	go tool cover -func=coverage.out | tail -n 1
	echo "wrote coverage.html"
}

check_bench() {
	step "benchmarks"
	go test -run='^$' -bench="${BENCH:-.}" -benchmem -benchtime="${BENCHTIME:-1s}" ./...
}

check_fuzz() {
	step "fuzz FuzzParseEntry for ${FUZZTIME:-30s}"
	go test -run='^$' -fuzz=FuzzParseEntry -fuzztime="${FUZZTIME:-30s}" .
}

# check_e2e is the tutorial's end-to-end level: the built binary, driven over
# HTTP with the README's own curl session, then stopped with SIGTERM.
check_e2e() {
	step "end to end against the built binary"
	command -v curl >/dev/null || { echo "e2e needs curl"; return 1; }
	local tmp bin pid addr status
	tmp=$(mktemp -d)
	bin="$tmp/addrservice"
	go build -o "$bin" .
	trap 'kill -9 ${pid:-} 2>/dev/null || true; rm -rf "$tmp"' RETURN

	e2e_start() { # starts the binary with "$@" and sets pid and addr
		"$bin" -addr 127.0.0.1:0 "$@" >"$tmp/log" 2>&1 &
		pid=$!
		addr=""
		for _ in $(seq 100); do
			addr=$(sed -n 's/.*msg=starting addr=\([^ ]*\).*/\1/p' "$tmp/log")
			[[ -n $addr ]] && return 0
			sleep 0.05
		done
		echo "the binary did not start:"; cat "$tmp/log"; return 1
	}

	e2e_start
	# Every curl line of the README's session that ends in "# expect NNN" must
	# answer NNN; the other lines (variables) run as they are.
	local session line cmd want got failures=0
	session=$(sed -n '/<!-- e2e:begin -->/,/<!-- e2e:end -->/p' README.md | sed "s/localhost:8080/$addr/g")
	[[ -n $session ]] || { echo "README.md has no e2e session"; return 1; }
	while IFS= read -r line; do
		if [[ $line =~ ^(curl.*[^ ])\ +#\ expect\ ([0-9]{3}) ]]; then
			cmd=${BASH_REMATCH[1]} want=${BASH_REMATCH[2]}
			got=$(eval "$cmd -s -o /dev/null -w '%{http_code}'") || got="curl failed"
			if [[ $got == "$want" ]]; then echo "ok   $want  $cmd"; else echo "FAIL $got (want $want)  $cmd"; failures=$((failures + 1)); fi
		elif [[ $line =~ ^[a-z_]+= ]]; then
			eval "$line"
		fi
	done <<<"$session"
	((failures == 0)) || { echo "$failures README commands did not answer as documented"; return 1; }

	echo "SIGTERM: drains and exits 0"
	kill -TERM "$pid"
	status=0; wait "$pid" || status=$?
	[[ $status == 0 ]] || { echo "exit status $status after SIGTERM, want 0"; cat "$tmp/log"; return 1; }
	grep -q 'msg=stopped' "$tmp/log" || { echo "no stopped line in the log"; return 1; }

	echo "SIGTERM lets an in-flight request finish, then exits 0"
	printf '{"full_name":"Slow Upload"}%3000s' "" >"$tmp/slow.json"
	e2e_start
	curl -s -o /dev/null -w '%{http_code}' --limit-rate 1k --json @"$tmp/slow.json" "http://$addr/addresses" >"$tmp/slow.status" &
	local curl_pid=$!
	sleep 0.5
	kill -TERM "$pid"
	sleep 0.5
	kill -0 "$pid" 2>/dev/null || { echo "exited with a request in flight"; return 1; }
	wait "$curl_pid" || true
	[[ $(cat "$tmp/slow.status") == 201 ]] || { echo "in-flight request got $(cat "$tmp/slow.status"), want 201"; return 1; }
	status=0; wait "$pid" || status=$?
	[[ $status == 0 ]] || { echo "exit status $status, want 0"; return 1; }

	echo "a second signal exits at once"
	printf '{"full_name":"Slower Upload"}%30000s' "" >"$tmp/slow.json"
	e2e_start
	curl -s -o /dev/null --limit-rate 1k --json @"$tmp/slow.json" "http://$addr/addresses" &
	curl_pid=$!
	sleep 0.5
	kill -TERM "$pid"
	sleep 0.3
	kill -TERM "$pid"
	status=0; wait "$pid" || status=$?
	kill "$curl_pid" 2>/dev/null || true
	[[ $status == 143 ]] || { echo "exit status $status after two signals, want 143 (killed by SIGTERM)"; return 1; }

	echo "-data: an acknowledged entry survives kill -9, with its ETag"
	e2e_start -data "$tmp/data"
	local loc etag
	loc=$(curl -s -o /dev/null -w '%header{location}' --json @testdata/ada-lovelace.json "http://$addr/addresses")
	etag=$(curl -s -o /dev/null -w '%header{etag}' "http://$addr$loc")
	kill -9 "$pid"; wait "$pid" 2>/dev/null || true
	e2e_start -data "$tmp/data"
	[[ $(curl -s "http://$addr$loc") == "$(cat testdata/ada-lovelace.json)" ]] || { echo "entry lost or changed after kill -9"; return 1; }
	[[ $(curl -s -o /dev/null -w '%header{etag}' "http://$addr$loc") == "$etag" ]] || { echo "ETag changed across the restart"; return 1; }
	status=0; "$bin" -addr 127.0.0.1:0 -data "$tmp/data" >/dev/null 2>"$tmp/err" || status=$?
	[[ $status == 1 ]] && grep -q "in use by another process" "$tmp/err" || { echo "second process on the data directory: status $status"; cat "$tmp/err"; return 1; }
	kill -TERM "$pid"; wait "$pid" || true
	echo '{"full_name":' >"$tmp/data/0123456789abcdef0123456789abcdef.json"
	status=0; "$bin" -addr 127.0.0.1:0 -data "$tmp/data" >/dev/null 2>"$tmp/err" || status=$?
	[[ $status == 1 ]] && grep -q "0123456789abcdef0123456789abcdef.json" "$tmp/err" || { echo "corrupt file: status $status"; cat "$tmp/err"; return 1; }

	echo "a bad flag exits 2 with one line on stderr"
	status=0; "$bin" -max-body lots >/dev/null 2>"$tmp/err" || status=$?
	[[ $status == 2 && $(wc -l <"$tmp/err") == 1 ]] || { echo "status $status, stderr:"; cat "$tmp/err"; return 1; }

	echo "a port in use exits 1"
	e2e_start
	status=0; "$bin" -addr "$addr" >/dev/null 2>"$tmp/err" || status=$?
	[[ $status == 1 ]] || { echo "status $status, stderr:"; cat "$tmp/err"; return 1; }
	kill -TERM "$pid"; wait "$pid" || true
	echo "ok"
}

case "${1:-all}" in
all)
	check_fmt
	check_vet
	check_lint
	check_test
	check_e2e
	step "all checks passed"
	;;
fmt | vet | lint | test | cover | bench | fuzz | e2e) "check_$1" ;;
*)
	echo "usage: $0 [all|fmt|vet|lint|test|cover|e2e|bench|fuzz]" >&2
	exit 2
	;;
esac
