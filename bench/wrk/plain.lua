-- Plain GET of the URL's path; headers given as "Name: value" script arguments are added.
function init(args)
   for _, h in ipairs(args) do
      local name, value = h:match("^([^:]+):%s*(.*)$")
      if name then wrk.headers[name] = value end
   end
end
