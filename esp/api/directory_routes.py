"""Domains (with their DNS records and DKIM keys), users and aliases."""

from __future__ import annotations

from twisted.internet.threads import deferToThreadPool
from twisted.web.iweb import IRequest

from esp.addresses import InvalidAddress, parse_address
from esp.api.auth_routes import user_detail
from esp.api.base import APIBase, field_address, field_domain
from esp.api.framework import (
    ApiError,
    Principal,
    endpoint,
    forbidden,
    invalid_field,
    not_found,
)
from esp.api.models import (
    AliasCreate,
    AliasOut,
    AliasPage,
    DkimCreate,
    DkimList,
    DkimOut,
    DnsRecord,
    DnsRecords,
    DomainCreate,
    DomainFilter,
    DomainFiltersBody,
    DomainFiltersOut,
    DomainOut,
    DomainPage,
    DomainUpdate,
    FilterInfo,
    Paging,
    PasswordChange,
    UserCreate,
    UserDetail,
    UserOut,
    UserPage,
    UserQuery,
    UserUpdate,
)
from esp.auth import WeakPassword, check_new_password
from esp.dnsrecords import Checked, check_records, expected_records
from esp.storage import dkimkeys
from esp.storage.directory import (
    AlreadyExists,
    DirectoryError,
    Domain,
    NotFound,
    User,
    add_alias_txn,
    add_domain_txn,
    add_user_txn,
    parse_alias_source,
    remove_domain_txn,
    remove_user_txn,
    set_password_txn,
)
from esp.storage.maildir import retire
from esp.storage.manage import (
    AliasRow,
    delete_alias_txn,
    domain_counts_txn,
    domain_filters_txn,
    find_alias_txn,
    get_alias_txn,
    page_aliases_txn,
    page_domains_txn,
    page_users_txn,
    set_domain_enabled_txn,
    set_domain_filters_txn,
    update_user_txn,
)


def domain_out(domain: Domain) -> DomainOut:
    return DomainOut(name=domain.name, enabled=domain.enabled, users=domain.users,
                     aliases=domain.aliases)


def user_out(user: User) -> UserOut:
    return UserOut(id=user.id, address=user.address, display_name=user.display_name,
                   role=user.role, enabled=user.enabled, quota_bytes=user.quota_bytes,
                   quota_messages=user.quota_messages, used_bytes=user.used_bytes,
                   used_messages=user.used_messages)


def alias_out(alias: AliasRow) -> AliasOut:
    return AliasOut(id=alias.id, source=alias.source, destination=alias.destination)


def _summary(user: User) -> dict[str, object]:
    return user_out(user).model_dump(exclude={"used_bytes", "used_messages"})


def visible_domains(principal: Principal) -> list[int] | None:
    """The domain ids a listing may show the caller (None: all)."""
    if principal.key_domain_id is not None:
        return [principal.key_domain_id] if principal.administers(
            principal.key_domain_id) else []
    if principal.role == "superadmin":
        return None
    return [principal.user.domain_id]


class DirectoryRoutes(APIBase):
    # -- domains -----------------------------------------------------------------------------

    @endpoint("GET", "/api/v1/domains", summary="Domains the caller administers",
              tag="domains", scope="domains:read", query=Paging, response=DomainPage)
    async def list_domains(self, request: IRequest, principal: Principal,
                           query: Paging) -> DomainPage:
        principal.require_admin()
        domains, total = await self.db.run("api_domains", page_domains_txn,
                                           visible_domains(principal), query.limit,
                                           query.offset)
        return DomainPage(items=[domain_out(d) for d in domains], total=total,
                          limit=query.limit, offset=query.offset)

    @endpoint("POST", "/api/v1/domains", summary="Host a new domain", tag="domains",
              scope="domains:write", body=DomainCreate, response=DomainOut, status=201,
              errors=(409,))
    async def create_domain(self, request: IRequest, principal: Principal,
                            body: DomainCreate) -> DomainOut:
        principal.require_superadmin()
        name = field_domain("name", body.name)
        try:
            domain = await self.change(request, principal, "domain.create", name,
                                       add_domain_txn, name,
                                       summary=lambda d: {"after": domain_out(d).model_dump()})
        except AlreadyExists as e:
            raise ApiError(409, "exists", str(e)) from None
        request.setHeader(b"location", f"/api/v1/domains/{name}".encode())
        return domain_out(domain)

    @endpoint("GET", "/api/v1/domains/<name>", summary="One domain", tag="domains",
              scope="domains:read", response=DomainOut)
    async def get_domain(self, request: IRequest, principal: Principal, name: str) -> DomainOut:
        domain = await self.domain(principal, name)
        return domain_out(await self.db.run("api_domain", domain_counts_txn, domain.id))

    @endpoint("PATCH", "/api/v1/domains/<name>", summary="Enable or disable a domain",
              tag="domains", scope="domains:write", body=DomainUpdate, response=DomainOut,
              errors=(409,))
    async def update_domain(self, request: IRequest, principal: Principal, name: str,
                            body: DomainUpdate) -> DomainOut:
        principal.require_superadmin()
        domain = await self.domain(principal, name)
        if body.enabled is False and domain.id == principal.user.domain_id:
            raise ApiError(409, "conflict", "you may not disable your own domain")
        if body.enabled is None:
            return domain_out(await self.db.run("api_domain", domain_counts_txn, domain.id))
        updated = await self.change(
            request, principal, "domain.update", domain.name, set_domain_enabled_txn,
            domain.id, body.enabled,
            summary=lambda d: {"before": {"enabled": domain.enabled},
                               "after": {"enabled": d.enabled}})
        return domain_out(updated)

    @endpoint("DELETE", "/api/v1/domains/<name>", summary="Stop hosting a domain (it must "
              "have no users left)", tag="domains", scope="domains:write", status=204,
              errors=(409,))
    async def delete_domain(self, request: IRequest, principal: Principal, name: str) -> None:
        principal.require_superadmin()
        domain = await self.domain(principal, name)
        try:
            await self.change(request, principal, "domain.remove", domain.name,
                              remove_domain_txn, domain.name,
                              summary=lambda d: {"before": {"name": d.name}})
        except DirectoryError as e:
            raise ApiError(409, "not_empty", str(e)) from None

    @endpoint("GET", "/api/v1/domains/<name>/dns", summary="The DNS records to publish, and "
              "what DNS says of each today", tag="domains", scope="domains:read",
              response=DnsRecords)
    async def domain_dns(self, request: IRequest, principal: Principal,
                         name: str) -> DnsRecords:
        domain = await self.domain(principal, name)
        keys = await self.db.run("api_dkim_keys", dkimkeys.list_keys_txn, domain.name)
        records = expected_records(domain.name, self.services.hostname, keys)
        services = self.services
        if services.resolver is None:
            checked = [Checked(r, "unchecked", ()) for r in records]
        else:
            checked = await deferToThreadPool(services.reactor, services.dns_pool,
                                              check_records, services.resolver, records)
        return DnsRecords(domain=domain.name, records=[
            DnsRecord(type=c.record.type, name=c.record.name, value=c.record.value,
                      purpose=c.record.purpose, status=c.status, found=list(c.found))
            for c in checked])

    @endpoint("GET", "/api/v1/domains/<name>/dkim-keys", summary="The domain's DKIM keys",
              tag="domains", scope="dkim:read", response=DkimList)
    async def list_dkim(self, request: IRequest, principal: Principal, name: str) -> DkimList:
        domain = await self.domain(principal, name)
        keys = await self.db.run("api_dkim_keys", dkimkeys.list_keys_txn, domain.name)
        return DkimList(items=[_dkim_out(k) for k in keys])

    @endpoint("POST", "/api/v1/domains/<name>/dkim-keys", summary="Make a DKIM key (its "
              "public half is the record to publish)", tag="domains", scope="dkim:write",
              body=DkimCreate, response=DkimOut, status=201, errors=(409,))
    async def create_dkim(self, request: IRequest, principal: Principal, name: str,
                          body: DkimCreate) -> DkimOut:
        domain = await self.domain(principal, name)
        if self.services.dkim_box is None:
            raise ApiError(409, "unavailable", "DKIM keys are not configured on this server")
        algorithm = dkimkeys.ALGORITHMS[body.algorithm]
        selector = body.selector.lower()
        try:
            key = await self.change(
                request, principal, "dkim.generate", f"{selector}._domainkey.{domain.name}",
                dkimkeys.add_key_txn, self.services.dkim_box, domain.name, selector,
                algorithm, summary=lambda k: {"after": {"algorithm": k.algorithm}})
        except dkimkeys.DKIMKeyError as e:
            raise ApiError(409, "exists", str(e)) from None
        return _dkim_out(key)

    # -- filters -----------------------------------------------------------------------------

    async def _filters_out(self, domain: Domain) -> DomainFiltersOut:
        found = await self.db.run("api_domain_filters", domain_filters_txn, [domain.name])
        mine = found.get(domain.name, {})
        services = self.services
        return DomainFiltersOut(
            domain=domain.name, chain=list(services.filter_chain),
            disabled=list(mine.get("disabled", [])), enabled=list(mine.get("enabled", [])),
            installed=[FilterInfo(
                name=name, description=str(f.description),
                sends_mail_off_machine=bool(getattr(f, "sends_mail_off_machine", False)),
                settings=f.settings.model_json_schema())
                for name, f in sorted(services.filter_factories.items())])

    @endpoint("GET", "/api/v1/domains/<name>/filters", summary="The filter chain and this "
              "domain's choices in it", tag="domains", scope="domains:read",
              response=DomainFiltersOut)
    async def get_domain_filters(self, request: IRequest, principal: Principal,
                                 name: str) -> DomainFiltersOut:
        return await self._filters_out(await self.domain(principal, name))

    @endpoint("PUT", "/api/v1/domains/<name>/filters", summary="Turn filters of the chain off "
              "for this domain, or opt-in filters on", tag="domains", scope="domains:write",
              body=DomainFiltersBody, response=DomainFiltersOut, errors=(422,))
    async def set_domain_filters(self, request: IRequest, principal: Principal, name: str,
                                 body: DomainFiltersBody) -> DomainFiltersOut:
        domain = await self.domain(principal, name)
        chain = self.services.filter_chain
        for field_name, names in (("disabled", body.disabled), ("enabled", body.enabled)):
            unknown = [n for n in names if n not in chain]
            if unknown:
                raise ApiError(422, "unknown_filter",
                               f"not in the server's filter chain: {', '.join(unknown)}",
                               {"fields": [{"field": field_name,
                                            "problem": f"{', '.join(unknown)} not in the chain "
                                            f"({', '.join(chain) or 'empty'})"}]})
        choices = {"disabled": sorted(set(body.disabled)), "enabled": sorted(set(body.enabled))}
        before = await self._filters_out(domain)
        await self.change(request, principal, "domain.filters", domain.name,
                          set_domain_filters_txn, domain.id, choices,
                          summary=lambda _: {"before": {"disabled": before.disabled,
                                                        "enabled": before.enabled},
                                             "after": choices})
        if self.services.forget_domain_filters is not None:
            self.services.forget_domain_filters(domain.name)
        return await self._filters_out(domain)

    # -- users -------------------------------------------------------------------------------

    async def _listed_domain(self, principal: Principal, name: str | None) -> list[int] | None:
        if name is None:
            return visible_domains(principal)
        return [(await self.domain(principal, name, field="domain")).id]

    @endpoint("GET", "/api/v1/users", summary="Users of the domains the caller administers",
              tag="users", scope="users:read", query=UserQuery, response=UserPage,
              errors=(422,))
    async def list_users(self, request: IRequest, principal: Principal,
                         query: UserQuery) -> UserPage:
        principal.require_admin()
        domains = await self._listed_domain(principal, query.domain)
        domain_id = None
        if domains is not None:
            if not domains:
                return UserPage(items=[], total=0, limit=query.limit, offset=query.offset)
            domain_id = domains[0]
        users, total = await self.db.run("api_users", page_users_txn, domain_id, query.q,
                                         query.limit, query.offset)
        return UserPage(items=[user_out(u) for u in users], total=total, limit=query.limit,
                        offset=query.offset)

    @endpoint("POST", "/api/v1/users", summary="Make a user (with INBOX and the special-use "
              "mailboxes)", tag="users", scope="users:write", body=UserCreate,
              response=UserDetail, status=201, errors=(409, 422))
    async def create_user(self, request: IRequest, principal: Principal,
                          body: UserCreate) -> UserDetail:
        address = field_address("address", body.address)
        domain = await self.domain(principal, address.domain, field="address")
        if body.role == "superadmin":
            principal.require_superadmin()
        _check_password("password", body.password)
        hashed = await self.services.hash_password(body.password)
        try:
            user = await self.change(
                request, principal, "user.create", str(address), add_user_txn, address,
                hashed, self.services.maildir_root, body.display_name, body.role,
                body.quota_bytes, body.quota_messages,
                summary=lambda u: {"after": _summary(u)})
        except AlreadyExists as e:
            raise ApiError(409, "exists", str(e)) from None
        except DirectoryError as e:
            raise ApiError(409, "conflict", str(e)) from None
        assert user.domain_id == domain.id
        request.setHeader(b"location", f"/api/v1/users/{user.address}".encode())
        return await user_detail(self, user)

    @endpoint("GET", "/api/v1/users/<address>", summary="One user", tag="users",
              scope="users:read", response=UserDetail)
    async def get_user(self, request: IRequest, principal: Principal,
                       address: str) -> UserDetail:
        return await user_detail(self, await self.user(principal, address))

    @endpoint("PATCH", "/api/v1/users/<address>", summary="Change a user's name, role, "
              "quotas or whether they may log in", tag="users", scope="users:write",
              body=UserUpdate, response=UserDetail, errors=(409,))
    async def update_user(self, request: IRequest, principal: Principal, address: str,
                          body: UserUpdate) -> UserDetail:
        user = await self.user(principal, address)
        changes = body.model_dump(exclude_unset=True, exclude={"unlimited"})
        changes = {k: v for k, v in changes.items() if v is not None}
        for name in body.unlimited:
            if name in changes:
                raise invalid_field("unlimited", f"{name} is both set and lifted")
            changes[name] = None
        if (user.id != principal.user.id or set(changes) - {"display_name"}) and (
                not principal.manages(user)):
            raise forbidden(f"you may not change this of {user.address}")
        if user.id == principal.user.id and (
                changes.get("enabled") is False or changes.get("role", user.role) != user.role):
            raise ApiError(409, "conflict", "you may not disable yourself or change your "
                           "own role")
        if changes.get("role") == "superadmin":
            principal.require_superadmin()
        updated = await self.change(
            request, principal, "user.update", user.address, update_user_txn, user.id,
            changes, summary=lambda u: {"before": _summary(user), "after": _summary(u)})
        return await user_detail(self, updated)

    @endpoint("PUT", "/api/v1/users/<address>/password", summary="Set a user's password "
              "(one's own needs the current one)", tag="users", scope="users:write",
              body=PasswordChange, status=204)
    async def set_password(self, request: IRequest, principal: Principal, address: str,
                           body: PasswordChange) -> None:
        user = await self.user(principal, address)
        if user.id == principal.user.id:
            if body.current_password is None:
                raise invalid_field("current_password", "needed to change your own password")
            verified = await self.services.verify_password(user.password_hash,
                                                           body.current_password)
            if not verified:
                raise ApiError(403, "forbidden", "the current password is wrong")
        elif not principal.manages(user):
            raise forbidden(f"you may not change the password of {user.address}")
        _check_password("password", body.password)
        hashed = await self.services.hash_password(body.password)
        await self.change(request, principal, "user.passwd", user.address, set_password_txn,
                          parse_address(user.address), hashed)

    @endpoint("DELETE", "/api/v1/users/<address>", summary="Remove a user (their Maildir is "
              "moved aside, not deleted)", tag="users", scope="users:write", status=204,
              errors=(409,))
    async def delete_user(self, request: IRequest, principal: Principal,
                          address: str) -> None:
        user = await self.user(principal, address)
        if not principal.manages(user):
            raise forbidden(f"you may not remove {user.address}")
        if user.id == principal.user.id:
            raise ApiError(409, "conflict", "you may not remove yourself")
        await self.change(request, principal, "user.remove", user.address, remove_user_txn,
                          parse_address(user.address),
                          summary=lambda u: {"before": _summary(u)})
        await deferToThreadPool(self.services.reactor, self.services.disk_pool, retire,
                                self.services.maildir_root, user.maildir)

    # -- aliases -----------------------------------------------------------------------------

    @endpoint("GET", "/api/v1/aliases", summary="Aliases of the domains the caller "
              "administers", tag="aliases", scope="aliases:read", query=DomainFilter,
              response=AliasPage, errors=(422,))
    async def list_aliases(self, request: IRequest, principal: Principal,
                           query: DomainFilter) -> AliasPage:
        principal.require_admin()
        domains = await self._listed_domain(principal, query.domain)
        aliases, total = await self.db.run("api_aliases", page_aliases_txn, domains,
                                           query.limit, query.offset)
        return AliasPage(items=[alias_out(a) for a in aliases], total=total,
                         limit=query.limit, offset=query.offset)

    @endpoint("POST", "/api/v1/aliases", summary="Add an alias (one destination; add "
              "several for a list)", tag="aliases", scope="aliases:write", body=AliasCreate,
              response=AliasOut, status=201, errors=(409, 422))
    async def create_alias(self, request: IRequest, principal: Principal,
                           body: AliasCreate) -> AliasOut:
        try:
            source = parse_alias_source(body.source)
        except (InvalidAddress, ValueError) as e:
            raise invalid_field("source", str(e)) from None
        destination = field_address("destination", body.destination)
        domain = await self.domain(principal, source.domain, field="source")

        def add(cur: object) -> AliasRow:
            add_alias_txn(cur, source, destination)  # type: ignore[arg-type]
            return find_alias_txn(cur, domain.id, source.localpart,  # type: ignore[arg-type]
                                  str(destination))

        try:
            alias = await self.change(
                request, principal, "alias.add", f"{source.localpart}@{domain.name}", add,
                summary=lambda a: {"after": {"destination": a.destination}})
        except AlreadyExists as e:
            raise ApiError(409, "exists", str(e)) from None
        except NotFound as e:
            raise ApiError(422, "unknown_destination", str(e),
                           {"fields": [{"field": "destination", "problem": str(e)}]}) from None
        except DirectoryError as e:
            raise ApiError(422, "invalid_alias", str(e)) from None
        request.setHeader(b"location", f"/api/v1/aliases/{alias.id}".encode())
        return alias_out(alias)

    async def _alias(self, principal: Principal, alias_id: int) -> AliasRow:
        alias = await self.db.run("api_alias", get_alias_txn, alias_id)
        if alias is None:
            raise not_found(f"no alias {alias_id}")
        if not principal.administers(alias.domain_id):
            raise forbidden("you do not administer the domain of this alias")
        return alias

    @endpoint("GET", "/api/v1/aliases/<int:alias_id>", summary="One alias", tag="aliases",
              scope="aliases:read", response=AliasOut)
    async def get_alias(self, request: IRequest, principal: Principal,
                        alias_id: int) -> AliasOut:
        return alias_out(await self._alias(principal, alias_id))

    @endpoint("DELETE", "/api/v1/aliases/<int:alias_id>", summary="Remove an alias",
              tag="aliases", scope="aliases:write", status=204)
    async def delete_alias(self, request: IRequest, principal: Principal,
                           alias_id: int) -> None:
        alias = await self._alias(principal, alias_id)
        await self.change(request, principal, "alias.remove", alias.source, delete_alias_txn,
                          alias.id, summary=lambda _: {"before": {
                              "destination": alias.destination}})


def _dkim_out(key: dkimkeys.DKIMKey) -> DkimOut:
    return DkimOut(selector=key.selector, algorithm=key.algorithm, active=key.active,
                   dns_name=key.dns_name, dns_value=key.dns_value)


def _check_password(name: str, password: str) -> None:
    try:
        check_new_password(password)
    except WeakPassword as e:
        raise invalid_field(name, str(e)) from None
