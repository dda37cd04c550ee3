# Bare-metal installation: `cmake --install build [--prefix P]`, or
# `make install`. Puts
#   the binaries (and lotteryctl) in <prefix>/bin            (default /usr/local/bin)
#   config.ini                   in /etc/lottery/           (only if not there yet)
#   lottery-server.service       in /etc/systemd/system/    (/usr/lib/systemd/system when the prefix is /usr)
#   the user (sysusers.d)        in /etc/sysusers.d/        (/usr/lib/sysusers.d when the prefix is /usr)
# DESTDIR is honoured for all of them (staged installs, packaging).
#
# The unit names the installed binary, so it is written at install time,
# when the prefix is final (`cmake --install --prefix` may change it).
include(GNUInstallDirs)

set(LOTTERY_INSTALL_CONFIG_DIR "/etc/lottery" CACHE PATH "Where lottery's default config.ini is installed")
set(LOTTERY_INSTALL_SYSTEMD_UNIT_DIR "" CACHE PATH
    "systemd unit directory (empty: /usr/lib/systemd/system for prefix /usr, else /etc/systemd/system)")
set(LOTTERY_INSTALL_SYSUSERS_DIR "" CACHE PATH
    "sysusers.d directory (empty: /usr/lib/sysusers.d for prefix /usr, else /etc/sysusers.d)")

install(TARGETS lottery-server lottery-client lottery-datagen
        RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR}
        COMPONENT runtime)
if(TARGET lotteryctl)
  install(TARGETS lotteryctl RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR} COMPONENT runtime)
endif()

# Everything below runs at install time: \${...} is the install-time value.
install(CODE "
  set(_prefix \"\${CMAKE_INSTALL_PREFIX}\")
  set(_unit_dir \"${LOTTERY_INSTALL_SYSTEMD_UNIT_DIR}\")
  set(_sysusers_dir \"${LOTTERY_INSTALL_SYSUSERS_DIR}\")
  if(_prefix STREQUAL \"/usr\")
    if(NOT _unit_dir)
      set(_unit_dir /usr/lib/systemd/system)
    endif()
    if(NOT _sysusers_dir)
      set(_sysusers_dir /usr/lib/sysusers.d)
    endif()
  else()
    if(NOT _unit_dir)
      set(_unit_dir /etc/systemd/system)
    endif()
    if(NOT _sysusers_dir)
      set(_sysusers_dir /etc/sysusers.d)
    endif()
  endif()

  # The unit, with this install's paths.
  set(LOTTERY_BINDIR \"\${_prefix}/${CMAKE_INSTALL_BINDIR}\")
  set(LOTTERY_CONFIG_DIR \"${LOTTERY_INSTALL_CONFIG_DIR}\")
  configure_file(\"${PROJECT_SOURCE_DIR}/packaging/lottery-server.service.in\"
                 \"${PROJECT_BINARY_DIR}/packaging/lottery-server.service\" @ONLY)
  file(INSTALL \"${PROJECT_BINARY_DIR}/packaging/lottery-server.service\"
       DESTINATION \"\${_unit_dir}\" FILE_PERMISSIONS OWNER_READ OWNER_WRITE GROUP_READ WORLD_READ)

  # The user: sysusers.d/lottery.conf.
  file(MAKE_DIRECTORY \"${PROJECT_BINARY_DIR}/packaging\")
  configure_file(\"${PROJECT_SOURCE_DIR}/packaging/lottery.sysusers\"
                 \"${PROJECT_BINARY_DIR}/packaging/lottery.conf\" COPYONLY)
  file(INSTALL \"${PROJECT_BINARY_DIR}/packaging/lottery.conf\"
       DESTINATION \"\${_sysusers_dir}\" FILE_PERMISSIONS OWNER_READ OWNER_WRITE GROUP_READ WORLD_READ)

  # The default config, unless the administrator already has one.
  if(EXISTS \"\$ENV{DESTDIR}${LOTTERY_INSTALL_CONFIG_DIR}/config.ini\")
    message(STATUS \"Keeping: \$ENV{DESTDIR}${LOTTERY_INSTALL_CONFIG_DIR}/config.ini (already there)\")
  else()
    file(INSTALL \"${PROJECT_SOURCE_DIR}/packaging/config.ini\"
         DESTINATION \"${LOTTERY_INSTALL_CONFIG_DIR}\" FILE_PERMISSIONS OWNER_READ OWNER_WRITE GROUP_READ WORLD_READ)
  endif()
" COMPONENT system)
