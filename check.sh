#!/usr/bin/env bash
# check.sh is the project's one entry to its checks.
#
#   ./check.sh          everything CI runs: fmt, vet, cross, lint (when staticcheck is
#                       installed), test (race detector, coverage floor), e2e,
#                       contract, rename, recipe, postgres (when PostgreSQL is
#                       installed), metrics (when Prometheus is installed), profile
#   ./check.sh fmt      gofmt check
#   ./check.sh vet      go vet
#   ./check.sh cross    go vet (which compiles the tests too) for Linux, macOS
#                       and Windows, amd64 and arm64
#   ./check.sh lint     staticcheck, skipped when it is not installed
#   ./check.sh test     go test -race with coverage; fails below the floor
#   ./check.sh cover    coverage report as HTML in coverage.html
#   ./check.sh e2e      builds the binary, drives it over HTTP, stops it with SIGTERM
#   ./check.sh contract the built binary against openapi.json: a few hundred requests
#                       validated by kin-openapi, and a generated Go client running the
#                       README's session (testdata/contract, a module of its own);
#                       skipped when the Go module proxy cannot be reached
#   ./check.sh rename   the README's rename commands on a copy, then its tests
#   ./check.sh recipe   the README's second resource (/contacts) added to a copy, then its tests
#   ./check.sh postgres the project's PostgreSQL store (its own postgres.go, or else the
#                       README's steps to take it in, on a copy) against a throwaway
#                       database: store contract tests, the README's session,
#                       two instances on one database; skipped without PostgreSQL
#   ./check.sh metrics  the built binary scraped by a real Prometheus (Debian's
#                       prometheus, 1 s scrapes, as nobody when run as root); asks
#                       its HTTP API what it saw; promtool check metrics; skipped
#                       without Prometheus
#   ./check.sh profile  docs/profiling.md end to end: CPU and heap profiles of the
#                       built binary under a bounded curl load, top functions
#                       (PROFILE_SECONDS=5)
#   ./check.sh bench    benchmarks with allocation counts, then the fraction of the
#                       ceiling per workload (BENCHTIME=1s; ADDRSERVICE_BENCH_ENTRIES)
#   ./check.sh fuzz     fuzzes the entry decoder (FUZZTIME=30s by default)
#   ./check.sh load     wrk against the built binary and its ceiling, pinned to
#                       one core each (LOAD_ENTRIES=1000, LOAD_SECONDS=10, LOAD_RUNS=1)
set -euo pipefail
cd "$(dirname "$0")"

COVERAGE_FLOOR=90

# step names a step; ./check.sh with no argument says which one failed.
step() {
	[[ -z ${CHECK_STEP_FILE:-} ]] || printf '%s' "$*" >"$CHECK_STEP_FILE"
	printf '\n== %s\n' "$*"
}

# wait_for FILE SED_SCRIPT prints what the sed script finds in FILE, waiting
# up to 10 s for it; it fails when nothing turns up.
wait_for() {
	local found
	for _ in $(seq 100); do
		found=$(sed -n "$2" "$1")
		[[ -n $found ]] && { echo "$found"; return 0; }
		sleep 0.1
	done
	return 1
}

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

# check_cross compiles the service and its tests (go vet builds both) for
# the systems `go run .` must work on, so none of them breaks unseen.
check_cross() {
	step "cross-compile: go vet for Linux, macOS and Windows, amd64 and arm64"
	local os arch
	for os in linux darwin windows; do
		for arch in amd64 arm64; do
			GOOS=$os GOARCH=$arch go vet . || { echo "go vet fails for $os/$arch"; return 1; }
		done
	done
	echo "ok"
}

check_lint() {
	step "staticcheck"
	if ! command -v staticcheck >/dev/null 2>&1; then
		echo "skipped: staticcheck is not installed"
		return 0
	fi
	staticcheck -checks all ./...
	echo "ok"
}

check_test() {
	step "go test -race -cover (floor ${COVERAGE_FLOOR}%)"
	local profile
	profile=$(mktemp)
	go test -race -count=1 -timeout=3m -coverprofile="$profile" ./...
	if [[ -f postgres.go && -z ${ADDRSERVICE_TEST_DATABASE_URL:-} ]]; then
		# The PostgreSQL store copied in is tested only against a database
		# (./check.sh postgres, or this variable); its lines do not count here.
		echo "postgres.go is not counted: set ADDRSERVICE_TEST_DATABASE_URL to test it here"
		sed -i.bak '/\/postgres\.go:/d' "$profile" && rm -f "$profile.bak"
	fi
	local total
	total=$(go tool cover -func="$profile" | awk '/^total:/ { sub("%", "", $3); print $3 }')
	rm -f "$profile"
	echo "coverage counted against the floor: ${total}%"
	if awk -v t="$total" -v f="$COVERAGE_FLOOR" 'BEGIN { exit !(t < f) }'; then
		echo "coverage ${total}% is below the floor of ${COVERAGE_FLOOR}%"
		return 1
	fi
}

check_cover() {
	step "coverage report"
	go test -count=1 -timeout=3m -coverprofile=coverage.out ./...
	go tool cover -html=coverage.out -o coverage.html
	go tool cover -func=coverage.out | tail -n 1
	echo "wrote coverage.html"
}

# check_bench runs every benchmark, then prints each HTTP workload's
# fraction of the ceiling: ceiling ns/op divided by service ns/op.
# ADDRSERVICE_BENCH_ENTRIES=1000,100000,1000000 adds larger books.
check_bench() {
	step "benchmarks"
	local out
	out=$(mktemp)
	go test -run='^$' -bench="${BENCH:-.}" -benchmem -benchtime="${BENCHTIME:-1s}" ${BENCHFLAGS:-} ./... | tee "$out"
	step "fraction of the ceiling (in process, client and server sharing the CPU; ./check.sh load for the real figure)"
	awk '$1 ~ /^BenchmarkHTTP\// {
		name = $1; sub(/^BenchmarkHTTP\//, "", name); sub(/-[0-9]+$/, "", name)
		n = split(name, part, "/"); key = part[1] "/" part[2]
		ns[key, part[3]] = $3; if (!(key in seen)) { seen[key] = 1; order[++count] = key }
	}
	END { for (i = 1; i <= count; i++) { k = order[i]
		if (ns[k, "service"] > 0) printf "%-40s %6.3f\n", k, ns[k, "ceiling"] / ns[k, "service"] } }' "$out"
	rm -f "$out"
}

# check_bench_smoke runs each benchmark once on small books, so CI notices a
# benchmark that no longer runs without spending minutes on it.
check_bench_smoke() {
	step "benchmarks, once each (smoke test)"
	go test -short -run='^$' -bench=. -benchtime=1x ./... >/dev/null
	echo "ok"
}

check_fuzz() {
	step "fuzz FuzzParseEntry for ${FUZZTIME:-30s}"
	go test -run='^$' -fuzz=FuzzParseEntry -fuzztime="${FUZZTIME:-30s}" .
}

# readme_session ADDR runs the README's curl session, the lines between
# <!-- e2e:begin --> and <!-- e2e:end -->, against the service at ADDR: each
# curl line that ends in "# expect NNN" must answer NNN, and one that ends in
# "# expect NNN, Name: value" must also send that header; the other lines
# (variables) run as they are.
readme_session() {
	local session line cmd want got out header failures=0
	session=$(sed -n '/<!-- e2e:begin -->/,/<!-- e2e:end -->/p' README.md 2>/dev/null | sed "s/localhost:8080/$1/g")
	[[ -n $session ]] || { echo "skipped: README.md has no session between <!-- e2e:begin --> and <!-- e2e:end --> (a README of your own)"; return 0; }
	while IFS= read -r line; do
		if [[ $line =~ ^(curl.*[^ ])\ +#\ expect\ ([0-9]{3})(,\ ([A-Za-z-]+:\ [^ ]+))?\ *$ ]]; then
			cmd=${BASH_REMATCH[1]} want=${BASH_REMATCH[2]} header=${BASH_REMATCH[4]}
			out=$(eval "$cmd -s -o /dev/null -D - -w '\n%{http_code}'" | tr -d '\r') || out="curl failed"
			got=${out##*$'\n'}
			if [[ -n $header ]]; then
				want+=", $header"
				grep -qixF "$header" <<<"$out" && got+=", $header"
			fi
			if [[ $got == "$want" ]]; then echo "ok   $want  $cmd"; else echo "FAIL $got (want $want)  $cmd"; failures=$((failures + 1)); fi
		elif [[ $line =~ ^[a-z_]+= ]]; then
			eval "$line"
		fi
	done <<<"$session"
	((failures == 0)) || { echo "$failures README commands did not answer as documented"; return 1; }
}

# check_e2e is the tutorial's end-to-end level: the built binary, driven over
# HTTP with the README's own curl session, then stopped with SIGTERM.
check_e2e() {
	step "end to end against the built binary"
	command -v curl >/dev/null || { echo "e2e needs curl"; return 1; }
	local bin addr status
	tmp=$(mktemp -d) pid="" # global, so the EXIT trap can clean up after set -e
	trap 'kill -9 ${pid:-} 2>/dev/null || true; rm -rf "$tmp"' EXIT
	bin="$tmp/addrservice"
	go build -o "$bin" .
	trap 'kill -9 ${pid:-} 2>/dev/null || true; rm -rf "$tmp"; trap - EXIT RETURN' RETURN

	e2e_start() { # starts the binary with "$@" and sets pid and addr
		: >"$tmp/log" # exists before the first look at it
		"$bin" -addr 127.0.0.1:0 "$@" >"$tmp/log" 2>&1 &
		pid=$!
		addr=$(wait_for "$tmp/log" 's/.*msg=starting addr=\([^ ]*\).*/\1/p') && return 0
		echo "the binary did not start:"; cat "$tmp/log"; return 1
	}

	e2e_start
	readme_session "$addr"

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

	echo "SIGHUP drains like SIGTERM"
	e2e_start
	kill -HUP "$pid"
	status=0; wait "$pid" || status=$?
	[[ $status == 0 ]] && grep -q 'msg=stopped' "$tmp/log" || { echo "exit status $status after SIGHUP, want 0 and a stopped line"; return 1; }

	echo "a log reader that goes away (| head -1) does not stop the service"
	mkfifo "$tmp/fifo"
	"$bin" -addr 127.0.0.1:0 >"$tmp/fifo" 2>"$tmp/err" &
	pid=$!
	head -n 1 <"$tmp/fifo" >"$tmp/first"
	addr=$(wait_for "$tmp/first" 's/.*msg=starting addr=\([^ ]*\).*/\1/p') || { echo "the binary did not start"; return 1; }
	for _ in $(seq 20); do curl -s -o /dev/null "http://$addr/healthz" || true; sleep 0.02; done
	[[ $(curl -s -o /dev/null -w '%{http_code}' "http://$addr/healthz") == 200 ]] || { echo "the service died when its log reader left"; return 1; }
	grep -q 'writing the log failed' "$tmp/err" || { echo "no word on stderr of the failed log writes"; return 1; }
	kill -TERM "$pid"
	status=0; wait "$pid" || status=$?
	[[ $status == 0 ]] || { echo "exit status $status, want 0"; return 1; }

	echo "Expect: 100-continue with a Content-Length over -max-body: 413 at once"
	e2e_start
	[[ $(curl -s -o /dev/null -w '%{http_code}' -H 'Expect: 100-continue' -H 'Content-Type: application/json' \
		-H 'Content-Length: 99999999' --data-binary '{}' --max-time 5 "http://$addr/addresses") == 413 ]] || { echo "no 413"; return 1; }
	kill -TERM "$pid"; wait "$pid" || true

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
	rm "$tmp/data/0123456789abcdef0123456789abcdef.json"
	ln -s "$PWD/testdata/ada-lovelace.json" "$tmp/data/0123456789abcdef0123456789abcdef.json"
	status=0; "$bin" -addr 127.0.0.1:0 -data "$tmp/data" >/dev/null 2>"$tmp/err" || status=$?
	[[ $status == 1 ]] && grep -q "0123456789abcdef0123456789abcdef.json is not a regular file" "$tmp/err" || { echo "an entry that is a symlink: status $status"; cat "$tmp/err"; return 1; }

	echo "-version prints the build and exits 0"
	"$bin" -version | grep -q "^addrservice .* revision .* modified " || { echo "-version printed: $("$bin" -version)"; return 1; }

	echo "a bad flag exits 2 with one line on stderr"
	status=0; "$bin" -max-body lots >/dev/null 2>"$tmp/err" || status=$?
	[[ $status == 2 && $(wc -l <"$tmp/err") == 1 ]] || { echo "status $status, stderr:"; cat "$tmp/err"; return 1; }

	if [[ ! -f postgres.go ]]; then # not once a copy has taken the PostgreSQL store in
		echo "a database URL without the PostgreSQL store exits 2 with one line naming the file to copy, not the password"
		status=0; ADDRSERVICE_DATABASE_URL=postgres://addrservice:s3cret@localhost/addrservice "$bin" >/dev/null 2>"$tmp/err" || status=$?
		[[ $status == 2 && $(wc -l <"$tmp/err") == 1 ]] && grep -q testdata/postgres/postgres.go "$tmp/err" && ! grep -q s3cret "$tmp/err" ||
			{ echo "status $status, stderr:"; cat "$tmp/err"; return 1; }
	fi

	echo "a port in use exits 1"
	e2e_start
	status=0; "$bin" -addr "$addr" >/dev/null 2>"$tmp/err" || status=$?
	[[ $status == 1 ]] || { echo "status $status, stderr:"; cat "$tmp/err"; return 1; }
	kill -TERM "$pid"; wait "$pid" || true
	echo "ok"
}

# check_contract validates the built binary's answers against openapi.json
# with libraries nobody on this project wrote, from testdata/contract, a
# module of its own (so the service's go.mod still requires nothing): it
# generates the Go client with oapi-codegen, then runs the module's tests
# with the binary. Without the modules and no proxy to fetch them, it skips.
check_contract() {
	step "contract: the built binary against openapi.json (kin-openapi, an oapi-codegen client)"
	[[ -d testdata/contract ]] || { echo "skipped: testdata/contract/ is gone (a copy no one generates clients for)"; return 0; }
	local tmp out
	tmp=$(mktemp -d)
	trap 'rm -rf "$tmp"; trap - RETURN' RETURN
	if ! out=$(cd testdata/contract && go mod download 2>&1); then
		if grep -qiE 'dial tcp|no such host|connection refused|timeout|proxyconnect|network is unreachable|i/o timeout|lookup disabled' <<<"$out"; then
			echo "skipped: the Go module proxy cannot be reached ($(tail -n 1 <<<"$out"))"
			return 0
		fi
		echo "$out"
		return 1
	fi
	go build -o "$tmp/addrservice" .
	(
		cd testdata/contract
		go generate . # builds oapi-codegen, the larger part of this step's time when the build cache is cold
		ADDRSERVICE_BIN=$tmp/addrservice go test -count=1 -v . >"$tmp/test.log" 2>&1 || { cat "$tmp/test.log"; exit 1; }
		grep -E '^(--- |ok)|requests and answers' "$tmp/test.log"
	)
}

# check_rename runs the README's rename commands on a copy of the
# repository, then checks that no old spelling is left and that the renamed
# service builds, names itself and passes its tests.
check_rename() {
	step "rename: the README's commands on a copy"
	local copy block
	copy=$(mktemp -d)
	trap 'rm -rf "$copy"; trap - RETURN' RETURN
	tar --exclude=.git -cf - . | tar -xf - -C "$copy"
	block=$(sed -n '/<!-- rename:begin -->/,/<!-- rename:end -->/p' README.md 2>/dev/null | sed '/^<!--/d; /^```/d')
	[[ -n $block ]] || { echo "skipped: README.md has no rename block (a README of your own)"; return 0; }
	(cd "$copy" && eval "$block") || { echo "the README's rename commands failed: mend them in README.md"; return 1; }
	if grep -rnI -i --exclude=LICENSE 'addrservice' "$copy"; then echo "old spellings are left (above): the README's rename commands miss them"; return 1; fi
	(
		cd "$copy"
		go vet . && go build -o yourservice-bin .
		./yourservice-bin -h 2>&1 | grep -q 'YOURSERVICE_MAX_BODY' || { echo "-h does not name YOURSERVICE_ variables"; exit 1; }
		status=0; ./yourservice-bin -max-body lots 2>err || status=$?
		[[ $status == 2 ]] && grep -q '^yourservice: ' err || { echo "a bad flag: status $status, $(cat err)"; exit 1; }
		go test -count=1 -short -timeout=2m . >test.out 2>&1 || { tail -n 30 test.out; exit 1; }
	) || return 1
	echo "ok"
}

# check_recipe applies the README's worked example of a second resource,
# testdata/contacts/add-contacts.patch, to a copy and runs its tests. When
# the code moves under it, apply it by hand, mend it, and save it again with
# git diff > testdata/contacts/add-contacts.patch.
check_recipe() {
	step "recipe: /contacts added to a copy"
	if [[ ! -f testdata/contacts/add-contacts.patch ]]; then
		echo "skipped: testdata/contacts/ is gone (a copy that has its own resources)"
		return 0
	fi
	local copy
	copy=$(mktemp -d)
	trap 'rm -rf "$copy"; trap - RETURN' RETURN
	tar --exclude=.git -cf - . | tar -xf - -C "$copy"
	(cd "$copy" && git apply testdata/contacts/add-contacts.patch) || {
		echo "testdata/contacts/add-contacts.patch no longer applies to this code. If your copy has resources"
		echo "of its own, delete testdata/contacts/ and this step skips. To keep the example, apply it by hand"
		echo "(git apply -3), mend it, and save it again with git diff > testdata/contacts/add-contacts.patch."
		return 1
	}
	(cd "$copy" && go vet . && go test -count=1 -short -timeout=2m .) || return 1
	echo "ok"
}

# postgres_bin_dir prints the directory of PostgreSQL's initdb and pg_ctl:
# the one initdb on the PATH links to, or else the newest of Debian's
# /usr/lib/postgresql/*/bin.
postgres_bin_dir() {
	local dir
	if dir=$(command -v initdb) && dir=$(dirname "$(readlink -f "$dir")") && [[ -x $dir/pg_ctl ]]; then
		echo "$dir"
		return 0
	fi
	for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
		[[ -x $dir/initdb && -x $dir/pg_ctl ]] && { echo "$dir"; return 0; }
	done
	return 1
}

# as_pg runs a PostgreSQL command as the server's user, from its directory
# (which that user, unlike the caller's, can surely enter).
as_pg() { (cd "$tmp/pg" && "${pg_as[@]}" "$@"); }

# module_files prints a checksum of go.mod and go.sum (which may not exist).
module_files() { cat go.mod go.sum 2>/dev/null | cksum || true; }

# postgres_cleanup stops what check_postgres started and removes what it made.
postgres_cleanup() {
	kill -9 ${pids[*]:-} 2>/dev/null || true
	if [[ -n ${pg_data:-} && -f $pg_data/postmaster.pid ]]; then
		as_pg "$pg_bin/pg_ctl" -D "$pg_data" -m immediate -w stop >/dev/null 2>&1 ||
			kill -9 "$(head -n 1 "$pg_data/postmaster.pid")" 2>/dev/null || true
	fi
	rm -rf "$tmp"
}

# check_postgres tests the project's own postgres.go or, in the template,
# follows the README's steps to PostgreSQL on a copy of the
# project, against a throwaway database: Debian's PostgreSQL, set up by
# initdb and pg_ctl in a temporary directory and reached on a Unix socket
# there only. It runs the store contract tests with the PostgreSQL store
# compiled in, the README's session against the binary, and two instances of
# the service on the one database; then it stops the database and removes
# everything.
check_postgres() {
	step "PostgreSQL: the README's steps on a copy, a throwaway database, two instances"
	pg_bin=$(postgres_bin_dir) || { echo "skipped: PostgreSQL is not installed"; return 0; }
	command -v curl >/dev/null || { echo "postgres needs curl"; return 1; }
	tmp=$(mktemp -d) pids=() pg_data="" pg_as=() # global, so the EXIT trap can clean up after set -e
	trap postgres_cleanup EXIT
	trap 'postgres_cleanup; trap - EXIT RETURN' RETURN
	local started=$SECONDS src=$tmp/src modules
	modules=$(module_files) # all the work happens on the copy

	mkdir "$src"
	tar --exclude=./.git -cf - . | tar -xf - -C "$src"
	if [[ -f postgres.go ]]; then
		echo "this project's own postgres.go, on a copy of the project"
	else # the template: the README's steps take the store in
		local steps line
		steps=$(sed -n '/<!-- postgres:begin -->/,/<!-- postgres:end -->/p' README.md 2>/dev/null | grep -E '^(cp|go) ' || true)
		[[ -n $steps ]] || { echo "skipped: no postgres.go here, and README.md has no steps to take it in (<!-- postgres:begin -->)"; return 0; }
		echo "the README's steps, on a copy of the project"
		while IFS= read -r line; do
			echo "+ $line"
			(cd "$src" && eval "$line")
		done <<<"$steps"
	fi
	(cd "$src" && go build -o addrservice .) || { echo "the project with its PostgreSQL store does not build"; return 1; }
	(cd "$src" && go vet . && test -z "$(gofmt -l .)") || { echo "the project with its PostgreSQL store fails go vet or gofmt"; return 1; }
	(cd "$src" && go mod tidy -diff) || { echo "go.mod or go.sum is not tidy (above): run go mod tidy"; return 1; }

	echo "a throwaway database ($pg_bin)"
	mkdir "$tmp/pg"
	if ((EUID == 0)); then # initdb refuses root; the server runs as a user that owns its directory
		local user=postgres
		id "$user" >/dev/null 2>&1 || user=nobody
		chown "$user" "$tmp/pg"
		chmod 711 "$tmp"
		pg_as=(runuser -u "$user" --)
	fi
	pg_data=$tmp/pg/data
	as_pg "$pg_bin/initdb" -D "$pg_data" -U postgres --auth=trust -E UTF8 --locale=C -N >"$tmp/initdb.log" 2>&1 ||
		{ cat "$tmp/initdb.log"; return 1; }
	as_pg "$pg_bin/pg_ctl" -D "$pg_data" -l "$tmp/pg/server.log" -w -o "-c listen_addresses='' -k $tmp/pg" start >/dev/null ||
		{ cat "$tmp/pg/server.log"; return 1; }
	# The database initdb made; the password is ignored (trust), but must never show in a log.
	local url="postgres://postgres:pg-s3cret@/postgres?host=$tmp/pg"

	echo "store contract tests, with PostgreSQL, and the benchmark once"
	(cd "$src" && ADDRSERVICE_TEST_DATABASE_URL=$url go test -race -count=1 -timeout 120s -run 'Contract|Postgres' -bench PostgresStore -benchtime 1x . >"$tmp/test.log" 2>&1) ||
		{ cat "$tmp/test.log"; return 1; }
	grep -E '^(ok|PASS)' "$tmp/test.log"

	local bin=$src/addrservice addr a b
	# instance LOG starts the binary on the database, logging to LOG, and
	# sets addr to where it listens.
	instance() {
		: >"$1"
		ADDRSERVICE_DATABASE_URL=$url "$bin" -addr 127.0.0.1:0 >"$1" 2>&1 &
		pids+=($!)
		addr=$(wait_for "$1" 's/.*msg=starting addr=\([^ ]*\).*/\1/p') && return 0
		echo "the binary did not start:"; cat "$1"; return 1
	}
	instance "$tmp/a.log"
	a=$addr
	echo "the README's session, on PostgreSQL"
	readme_session "$a"

	instance "$tmp/b.log"
	b=$addr
	echo "an entry created on one instance is read on the other, with the same ETag"
	local loc etag
	loc=$(curl -s -o /dev/null -w '%header{location}' --json @testdata/ada-lovelace.json "http://$a/addresses")
	etag=$(curl -s -o /dev/null -w '%header{etag}' "http://$a$loc")
	[[ -n $loc && -n $etag ]] || { echo "create on $a: location '$loc', ETag '$etag'"; return 1; }
	[[ $(curl -s "http://$b$loc") == "$(cat testdata/ada-lovelace.json)" ]] || { echo "the entry read on $b differs"; return 1; }
	[[ $(curl -s -o /dev/null -w '%header{etag}' "http://$b$loc") == "$etag" ]] || { echo "the ETag read on $b differs"; return 1; }

	local writers=16 round n args out
	echo "$writers PUTs at once with one If-Match, half on each instance: one 204 per version, the rest 412"
	for round in 1 2 3 4 5; do
		args=()
		for n in $(seq "$writers"); do
			((n == 1)) || args+=(--next)
			args+=(-s -o /dev/null -w '%{http_code} %header{etag}\n' -X PUT -H "If-Match: $etag"
				--json "{\"full_name\":\"Round $round, writer $n\"}" "http://$([[ $((n % 2)) == 0 ]] && echo "$a" || echo "$b")$loc")
		done
		out=$(curl --no-progress-meter --parallel --parallel-immediate --parallel-max "$writers" "${args[@]}")
		if [[ $(grep -c '^204 ' <<<"$out") != 1 || $(grep -c '^412 ' <<<"$out") != $((writers - 1)) ]]; then
			echo "round $round, If-Match $etag: want one 204 and $((writers - 1)) 412s, got:"; sort <<<"$out" | uniq -c; return 1
		fi
		etag=$(sed -n 's/^204 //p' <<<"$out")
		for addr in "$a" "$b"; do
			[[ $(curl -s -o /dev/null -w '%header{etag}' "http://$addr$loc") == "$etag" ]] || { echo "round $round: $addr does not serve the winner's ETag $etag"; return 1; }
		done
	done

	echo "creates on both instances at once get distinct ids, all listed by either"
	args=()
	for n in $(seq 40); do
		((n == 1)) || args+=(--next)
		args+=(-s -o /dev/null -w '%{http_code} %header{location}\n' --json @testdata/zoe-muller.json "http://$([[ $((n % 2)) == 0 ]] && echo "$a" || echo "$b")/addresses")
	done
	out=$(curl --no-progress-meter --parallel --parallel-immediate --parallel-max 40 "${args[@]}")
	[[ $(grep -c '^201 /addresses/' <<<"$out") == 40 && $(sort -u <<<"$out" | wc -l) == 40 ]] || { echo "40 creates:"; echo "$out"; return 1; }
	for addr in "$a" "$b"; do
		curl -s "http://$addr/addresses?limit=1000" | grep -o '"[0-9a-f]\{32\}":{' | cut -c2-33 >"$tmp/listed"
		sed 's|.*/||' <<<"$out" | grep -vxFf "$tmp/listed" && { echo "$addr does not list the ids above"; return 1; }
	done

	echo "SIGTERM: both exit 0; no log holds the password"
	local pid status
	for pid in "${pids[@]}"; do
		kill -TERM "$pid"
		status=0; wait "$pid" || status=$?
		[[ $status == 0 ]] || { echo "exit status $status after SIGTERM, want 0"; cat "$tmp"/a.log "$tmp"/b.log; return 1; }
	done
	pids=()
	! grep -l pg-s3cret "$tmp"/*.log "$tmp/pg/server.log" || { echo "the password is in the logs above"; return 1; }

	as_pg "$pg_bin/pg_ctl" -D "$pg_data" -m fast -w stop >/dev/null
	pg_data=""
	if [[ $(module_files) != "$modules" ]]; then
		echo "this check changed the project's go.mod or go.sum; it must work on its copy only"; return 1
	fi
	echo "ok ($((SECONDS - started)) s)"
}

# free_port prints a TCP port on 127.0.0.1 that nothing listens on now,
# below Linux's ephemeral range, where outgoing connections take theirs.
free_port() {
	local port
	for _ in $(seq 50); do
		port=$((20000 + RANDOM % 12000))
		(exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || { echo "$port"; return 0; }
	done
	return 1
}

# prom_query EXPR prints the value of the first sample Prometheus's HTTP API
# answers for the instant query EXPR, or nothing.
prom_query() {
	curl -s --max-time 5 -G "http://$prom_addr/api/v1/query" --data-urlencode "query=$1" |
		sed -n 's/.*"value":\[[^,]*,"\([^"]*\)"\].*/\1/p'
}

# prom_expect EXPR WANT waits up to 15 s (scrapes are 1 s apart) for EXPR
# to answer WANT, which is a value or, when it starts with ~, a regular
# expression the value must match.
prom_expect() {
	local got
	for _ in $(seq 75); do
		got=$(prom_query "$1")
		if [[ ${2:0:1} == "~" && $got =~ ${2:1} ]] || [[ $got == "$2" ]]; then
			echo "ok   $1 = $got"
			return 0
		fi
		sleep 0.2
	done
	echo "FAIL $1 = '${got}', want $2"
	return 1
}

metrics_cleanup() {
	kill ${pids[*]:-} 2>/dev/null || true
	wait ${pids[*]:-} 2>/dev/null || true
	rm -rf "$tmp"
}

# check_metrics starts the built binary and Debian's prometheus scraping it
# every second, sends a known set of requests, then asks Prometheus's HTTP
# API what it scraped: the target is up, the counts per route and status
# are those sent, histogram_quantile answers, the build info is there. It
# runs promtool check metrics on the exposition, and removes all it made.
check_metrics() {
	step "metrics: a real Prometheus scrapes the built binary"
	if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
		echo "skipped: prometheus and promtool are not installed (apt-get install prometheus)"
		return 0
	fi
	command -v curl >/dev/null || { echo "metrics needs curl"; return 1; }
	tmp=$(mktemp -d) pids=() # global, so the EXIT trap can clean up after set -e
	trap metrics_cleanup EXIT
	trap 'metrics_cleanup; trap - EXIT RETURN' RETURN
	local started=$SECONDS addr as=()
	go build -o "$tmp/addrservice" .
	: >"$tmp/service.log"
	"$tmp/addrservice" -addr 127.0.0.1:0 >"$tmp/service.log" 2>&1 &
	pids+=($!)
	addr=$(wait_for "$tmp/service.log" 's/.*msg=starting addr=\([^ ]*\).*/\1/p') || { echo "the binary did not start"; cat "$tmp/service.log"; return 1; }

	echo "promtool check metrics on GET /metrics"
	curl -s "http://$addr/metrics" >"$tmp/metrics.txt"
	promtool check metrics <"$tmp/metrics.txt" >"$tmp/promtool.out" 2>&1 || true
	[[ ! -s $tmp/promtool.out ]] || { echo "promtool reports:"; cat "$tmp/promtool.out"; return 1; }
	echo "ok   nothing to report"

	echo "prometheus scraping every second"
	mkdir "$tmp/prom"
	if ((EUID == 0)); then # it needs no privilege: run it as nobody, in a directory nobody owns
		chown nobody "$tmp/prom"
		chmod 711 "$tmp"
		as=(setpriv --reuid=nobody --regid="$(id -g nobody)" --clear-groups --)
	fi
	cat >"$tmp/prom/prometheus.yml" <<-YAML
		global:
		  scrape_interval: 1s
		scrape_configs:
		  - job_name: addrservice
		    static_configs:
		      - targets: ['$addr']
	YAML
	local try
	for try in 1 2 3; do # the port may be taken between the choice and the bind
		prom_addr=127.0.0.1:$(free_port) || { echo "no free port"; return 1; }
		"${as[@]}" prometheus --config.file="$tmp/prom/prometheus.yml" --storage.tsdb.path="$tmp/prom/data$try" \
			--web.listen-address="$prom_addr" --log.level=warn >"$tmp/prom/log" 2>&1 &
		pids+=($!)
		for _ in $(seq 100); do
			curl -sf --max-time 2 -o /dev/null "http://$prom_addr/-/ready" && break 2
			kill -0 "${pids[-1]}" 2>/dev/null || break
			sleep 0.2
		done
	done
	curl -sf --max-time 2 -o /dev/null "http://$prom_addr/-/ready" || { echo "prometheus did not start:"; cat "$tmp/prom/log"; return 1; }

	echo "a known set of requests: 3 creates, 5 reads, 2 reads of an unknown id, 1 unknown path"
	local loc n
	for n in 1 2 3; do loc=$(curl -s -o /dev/null -w '%header{location}' --json @testdata/ada-lovelace.json "http://$addr/addresses"); done
	for n in 1 2 3 4 5; do curl -s -o /dev/null "http://$addr$loc"; done
	for n in 1 2; do curl -s -o /dev/null "http://$addr/addresses/0123456789abcdef0123456789abcdef"; done
	curl -s -o /dev/null "http://$addr/nope"

	local count=http_server_request_duration_seconds_count
	prom_expect 'up{job="addrservice"}' 1
	prom_expect "$count{http_request_method=\"POST\",http_route=\"/addresses\",http_response_status_code=\"201\"}" 3
	prom_expect "$count{http_request_method=\"GET\",http_route=\"/addresses/{id}\",http_response_status_code=\"200\"}" 5
	prom_expect "$count{http_request_method=\"GET\",http_route=\"/addresses/{id}\",http_response_status_code=\"404\"}" 2
	prom_expect "$count{http_request_method=\"GET\",http_route=\"\",http_response_status_code=\"404\"}" 1
	prom_expect 'addrservice_store_entries' 3
	prom_expect 'histogram_quantile(0.99, sum by (le) (http_server_request_duration_seconds_bucket{http_route="/addresses/{id}"}))' '~^[0-9.e+-]+$'
	prom_expect 'count(addrservice_build_info{version!="",revision!="",go_version=~"go.+"} == 1)' 1
	echo "ok ($((SECONDS - started)) s)"
}

# check_profile does what docs/profiling.md describes, on the built binary:
# it seeds entries, puts it under load (curl, bounded in requests and
# time), takes a CPU profile and a heap profile from the debug listener,
# and prints the top functions with go tool pprof.
# PROFILE_SECONDS=5 sets the CPU profile's length.
check_profile() {
	step "profile: CPU and heap profiles of the built binary under load"
	command -v curl >/dev/null || { echo "profile needs curl"; return 1; }
	local bin addr debug loc seconds=${PROFILE_SECONDS:-5}
	tmp=$(mktemp -d) pid="" load_pids=() # global, so the EXIT trap can clean up after set -e
	trap 'kill ${pid:-} ${load_pids[*]:-} 2>/dev/null || true; rm -rf "$tmp"' EXIT
	trap 'kill ${pid:-} ${load_pids[*]:-} 2>/dev/null || true; rm -rf "$tmp"; trap - EXIT RETURN' RETURN
	bin=$tmp/addrservice
	go build -o "$bin" .
	: >"$tmp/log"
	"$bin" -addr 127.0.0.1:0 -debug-addr 127.0.0.1:0 >"$tmp/log" 2>&1 &
	pid=$!
	addr=$(wait_for "$tmp/log" 's/.*msg=starting addr=\([^ ]*\).*/\1/p') || { echo "the binary did not start"; cat "$tmp/log"; return 1; }
	debug=$(sed -n 's/.*msg=starting .*debug_addr=\([^ ]*\).*/\1/p' "$tmp/log")

	# The load: 200 creates, then reads, pages and creates side by side
	# from 8 connections, each bounded in requests and by the profile's
	# length plus 20 s.
	curl -s --parallel --parallel-max 8 --json @testdata/rajesh-kumar.json "http://$addr/addresses?seed=[1-200]" >/dev/null 2>&1
	loc=$(curl -s -o /dev/null -w '%header{location}' --json @testdata/ada-lovelace.json "http://$addr/addresses")
	load_pids=()
	timeout $((seconds + 20)) curl -s --parallel --parallel-max 4 "http://$addr$loc?n=[1-300000]" >/dev/null 2>&1 &
	load_pids+=($!)
	timeout $((seconds + 20)) curl -s --parallel --parallel-max 2 "http://$addr/addresses?limit=50&n=[1-100000]" >/dev/null 2>&1 &
	load_pids+=($!)
	timeout $((seconds + 20)) curl -s --parallel --parallel-max 2 --json @testdata/zoe-muller.json "http://$addr/addresses?n=[1-20000]" >/dev/null 2>&1 &
	load_pids+=($!)

	echo "a ${seconds} s CPU profile and a heap profile, from http://$debug/debug/pprof/"
	curl -sf -o "$tmp/cpu.pprof" "http://$debug/debug/pprof/profile?seconds=$seconds"
	curl -sf -o "$tmp/heap.pprof" "http://$debug/debug/pprof/heap"
	kill "${load_pids[@]}" 2>/dev/null || true
	wait "${load_pids[@]}" 2>/dev/null || true
	load_pids=()
	echo "the load, as /metrics counted it:"
	curl -s "http://$addr/metrics" | sed -n 's/^http_server_request_duration_seconds_count{\(.*\)} /  \1 /p'

	go tool pprof -top -nodecount=12 "$bin" "$tmp/cpu.pprof" 2>/dev/null | tee "$tmp/cpu.top"
	grep -q 'main\.' <(go tool pprof -top "$bin" "$tmp/cpu.pprof" 2>/dev/null) || { echo "the CPU profile has none of the service's own functions"; return 1; }
	echo
	go tool pprof -top -nodecount=8 -sample_index=alloc_space "$bin" "$tmp/heap.pprof" 2>/dev/null | tee "$tmp/heap.top"
	grep -q 'main\.' "$tmp/heap.top" || { echo "the heap profile has none of the service's own functions"; return 1; }
	kill -TERM "$pid"
	wait "$pid" || { echo "the binary did not exit 0 after SIGTERM"; return 1; }
	pid=""
	echo "ok"
}

# cpu_ticks PID prints the CPU time PID has used, user and system, in clock ticks.
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }

# check_load drives the built binary and a ceiling server (a bare net/http
# handler writing the same bytes, from the test binary) with wrk, the server
# on one core with GOMAXPROCS=1 and wrk on the other, and prints req/s, p99
# and the fraction of the ceiling for each workload.
check_load() {
	step "load test"
	if ! command -v wrk >/dev/null 2>&1; then
		echo "skipped: the load test needs wrk on the PATH (apt-get install wrk, or brew install wrk)"
		return 0
	fi
	local addr caddr n run workload target out rps p99 non2xx rss base
	tmp=$(mktemp -d) pid="" cpid="" # global, so the EXIT trap can clean up after set -e
	trap 'kill ${pid:-} ${cpid:-} 2>/dev/null || true; rm -rf "$tmp"' EXIT
	trap 'kill ${pid:-} ${cpid:-} 2>/dev/null || true; rm -rf "$tmp"; trap - EXIT RETURN' RETURN
	go build -o "$tmp/addrservice" .
	go test -c -o "$tmp/addrservice.test" .
	local server_cpu=() load_cpu=()
	if command -v taskset >/dev/null 2>&1 && (($(nproc) >= 2)); then
		server_cpu=(taskset -c 0) load_cpu=(taskset -c 1)
	fi
	export ENTRY_FILE=$PWD/testdata/rajesh-kumar.json IDS_FILE=$tmp/ids
	local seconds=${LOAD_SECONDS:-10} runs=${LOAD_RUNS:-1}
	local json_size
	json_size=$(tr -d '\n' <"$ENTRY_FILE" | wc -c)

	for n in $(tr , " " <<<"${LOAD_ENTRIES:-1000}"); do
		: >"$tmp/service.log"
		GOMAXPROCS=1 "${server_cpu[@]}" "$tmp/addrservice" -addr 127.0.0.1:0 -log-level info -max-store-bytes 4GiB >"$tmp/service.log" 2>&1 &
		pid=$!
		addr=$(wait_for "$tmp/service.log" 's/.*msg=starting addr=\([^ ]*\).*/\1/p') || { echo "the service did not start"; return 1; }
		base=$(awk '/VmRSS/ { print $2 }' "/proc/$pid/status" 2>/dev/null || echo 0)
		# Seed through the API; seed.lua stops at the count, wrk at its duration.
		local count=0 after page tries=0
		while ((count < n)); do
			((tries++ < 5)) || { echo "seeding stopped at $count of $n entries"; return 1; }
			SEED_COUNT=$((n - count)) "${load_cpu[@]}" wrk -t1 -c64 -d"$(((n - count) / 8000 + 2))s" -s testdata/load/seed.lua "http://$addr" >/dev/null
			: >"$tmp/ids"
			after=""
			while :; do
				page=$(curl -s "http://$addr/addresses?limit=1000${after:+&after=$after}" | grep -o '"[0-9a-f]\{32\}":{' | cut -c2-33 || true)
				[[ -n $page ]] || break
				echo "$page" >>"$tmp/ids"
				after=$(tail -n 1 <<<"$page")
			done
			count=$(wc -l <"$tmp/ids")
		done
		rss=$(awk '/VmRSS/ { print $2 }' "/proc/$pid/status" 2>/dev/null || echo 0)
		printf '\n%d entries of %d bytes: RSS %d MiB, %d bytes per entry (%.2f x the JSON)\n' "$count" "$json_size" \
			$((rss / 1024)) $(((rss - base) * 1024 / count)) "$(awk -v r="$(((rss - base) * 1024 / count))" -v j="$json_size" 'BEGIN { print r / j }')"

		: >"$tmp/ceiling.log"
		ADDRSERVICE_CEILING_FROM="http://$addr" ADDRSERVICE_CEILING_ID=$(head -n 1 "$tmp/ids") GOMAXPROCS=1 "${server_cpu[@]}" \
			"$tmp/addrservice.test" -test.run '^TestCeilingServer$' >"$tmp/ceiling.log" 2>&1 &
		cpid=$!
		caddr=$(wait_for "$tmp/ceiling.log" 's/^ceiling addr=//p') || { echo "the ceiling did not start"; cat "$tmp/ceiling.log"; return 1; }

		# ratio: service req/s over the ceiling's. cpu: the same in CPU time
		# the server spent per request (/proc/PID/stat), which a busy or noisy
		# machine disturbs far less than req/s; compare builds by it.
		printf '%-8s %4s %12s %10s %12s %10s %7s %9s %9s %6s\n' workload run service p99 ceiling p99 ratio 'µs/req' 'ceil µs' cpu
		for workload in ${LOAD_WORKLOADS:-get list listgz mixed post}; do
			for run in $(seq "$runs"); do
				local line="" ratio_in=() cpu_in=() target_pid ticks reqs
				for target in service ceiling; do
					local url="http://$addr"
					target_pid=$pid
					[[ $target == ceiling ]] && url="http://$caddr" target_pid=$cpid
					ticks=$(cpu_ticks "$target_pid")
					out=$("${load_cpu[@]}" wrk -t1 -c64 -d"${seconds}s" --latency -s "testdata/load/$workload.lua" "$url")
					ticks=$(($(cpu_ticks "$target_pid") - ticks))
					rps=$(awk '/^Requests\/sec/ { print $2 }' <<<"$out")
					reqs=$(awk '/ requests in / { print $1 }' <<<"$out")
					p99=$(awk '$1 == "99%" { print $2 }' <<<"$out")
					non2xx=$(awk '/Non-2xx/ { print $5 }' <<<"$out")
					[[ -z $non2xx ]] || { echo "$target $workload: $non2xx responses were not 2xx"; return 1; }
					line+=$(printf ' %12s %10s' "$rps" "$p99")
					ratio_in+=("$rps")
					cpu_in+=("$(awk -v t="$ticks" -v n="$reqs" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.2f", t * 1e6 / hz / n }')")
				done
				printf '%-8s %4s%s %7.3f %9s %9s %6.3f\n' "$workload" "$run" "$line" "$(awk -v s="${ratio_in[0]}" -v c="${ratio_in[1]}" 'BEGIN { print s / c }')" \
					"${cpu_in[0]}" "${cpu_in[1]}" "$(awk -v s="${cpu_in[0]}" -v c="${cpu_in[1]}" 'BEGIN { print c / s }')"
			done
		done
		kill "$pid" "$cpid"
		wait "$pid" "$cpid" 2>/dev/null || true
	done
}

case "${1:-all}" in
all)
	# The steps run in a child, so that a failing one stops them (set -e)
	# and this one can still say which it was.
	export CHECK_STEP_FILE
	CHECK_STEP_FILE=$(mktemp)
	status=0
	bash "./$(basename "${BASH_SOURCE[0]}")" all-steps || status=$?
	if ((status != 0)); then
		printf '\n== FAILED: %s (exit status %d); its output above says why\n' "$(cat "$CHECK_STEP_FILE")" "$status"
	fi
	rm -f "$CHECK_STEP_FILE"
	exit "$status"
	;;
all-steps)
	check_fmt
	check_vet
	check_cross
	check_lint
	check_test
	check_bench_smoke
	check_e2e
	check_contract
	check_rename
	check_recipe
	check_postgres
	check_metrics
	check_profile
	step "all checks passed"
	;;
fmt | vet | cross | lint | test | cover | bench | fuzz | e2e | contract | rename | recipe | postgres | metrics | profile | load) "check_$1" ;;
*)
	echo "usage: $0 [all|fmt|vet|cross|lint|test|cover|e2e|contract|rename|recipe|postgres|metrics|profile|bench|fuzz|load]" >&2
	exit 2
	;;
esac
