# Sourced by scripts/vm-run and scripts/kernel-build: apt-get and apt-cache
# on another Debian suite's packages without touching the system's apt
# sources. The caller defines $cache, die and log.
#
#   apt_suite SUITE    sets apt_opts for SUITE ("" = this machine's apt source)
#   apt-get "${apt_opts[@]}" download PACKAGE
#   apt_update         fetches the package lists apt_opts reads

# Suites with a private configuration (vm-run --deb, kernel-build SUITE:PACKAGE).
debian_suites="bullseye, bookworm, bookworm-backports, trixie, sid, unstable"

# The Debian mirror this machine uses.
debian_uri() {
    local f=/etc/apt/sources.list.d/debian.sources uri=""
    [ -r "$f" ] && uri=$(awk 'tolower($1) == "uris:" { print $2; exit }' "$f")
    [ -n "$uri" ] || [ ! -r /etc/apt/sources.list ] ||
        uri=$(awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i !~ /^\[/ && $i !~ /\]$/) { print $i; exit } }' /etc/apt/sources.list)
    [ -n "$uri" ] && echo "$uri"
}

# No options for this machine's apt source; for another suite, a one-line
# source list and private lists and cache under $cache/apt/SUITE, with the
# system's update hooks cleared.
apt_opts=() apt_suite_name="" apt_dir=""
apt_suite() { # suite
    local uri
    apt_suite_name=$1 apt_opts=() apt_dir=""
    [ -n "$apt_suite_name" ] || return 0
    uri=$(debian_uri) || die "no Debian archive URI in /etc/apt/sources.list.d/debian.sources (URIs:) or /etc/apt/sources.list"
    apt_dir="$cache/apt/$apt_suite_name"
    mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" || die "cannot create $apt_dir"
    printf '%s\n' '#clear APT::Update::Post-Invoke-Success;' '#clear APT::Update::Post-Invoke;' '#clear DPkg::Post-Invoke;' >"$cache/apt/apt.conf"
    echo "deb $uri $apt_suite_name main" >"$apt_dir/sources.list"
    apt_opts=(-c "$cache/apt/apt.conf" -o Dir::Etc::SourceList="$apt_dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
        -o Dir::State::Lists="$apt_dir/lists" -o Dir::Cache="$apt_dir/cache")
}

apt_update() {
    if [ -n "$apt_suite_name" ]; then
        log "updating the package lists of $apt_suite_name"
        apt-get "${apt_opts[@]}" update -qq >/dev/null 2>&1 || log "apt-get update for $apt_suite_name failed"
    else
        apt-get update -qq >/dev/null 2>&1
    fi
}

# Whether the suite's private lists were ever fetched.
apt_has_lists() {
    [ -z "$apt_suite_name" ] || ls "$apt_dir/lists/" 2>/dev/null | grep -q '_Packages'
}
